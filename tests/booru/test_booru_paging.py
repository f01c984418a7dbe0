"""Listing: cursor pages walk every post once; offset pages hit the cap; newer posts only."""
from __future__ import annotations

import pytest

from lora.booru import BooruError


def _expected(fake, pred) -> list[int]:
    return sorted((p.id for p in fake.posts if pred(p)), reverse=True)


def test_cursor_paging_yields_each_matching_post_once(booru, make_client) -> None:
    client = make_client(booru.url)
    got = [p.id for p in client.iter_posts("1girl -status:deleted", limit=7)]
    want = _expected(booru, lambda p: "1girl" in p.tags and not p.is_deleted)
    assert len(want) > 14  # several pages
    assert got == want  # newest first, every post, no repeats
    pages = [r.query.get("page") for r in booru.requests if r.path == "/posts.json"]
    assert pages[0] is None and all(pg.startswith("b") for pg in pages[1:])
    assert len(pages) == -(-len(want) // 7) + 1  # full pages, then one empty page ends the walk


def test_before_id_and_max_posts(booru, make_client) -> None:
    client = make_client(booru.url)
    ids = sorted(p.id for p in booru.posts)
    middle = ids[len(ids) // 2]
    got = [p.id for p in client.iter_posts("", before_id=middle, limit=5, max_posts=8)]
    assert got == sorted((i for i in ids if i < middle), reverse=True)[:8]


def test_offset_pages_past_the_cap_fail_clearly(make_booru, make_client) -> None:
    fake = make_booru(page_cap=3)
    client = make_client(fake.url)
    assert len(client.get_posts("", page=3, limit=2)) == 2
    with pytest.raises(BooruError, match=r"410.*cursor pages") as info:
        client.get_posts("", page=4, limit=2)
    assert "iter_posts" in str(info.value)
    # the cursor walk is not limited by the cap
    assert len(list(client.iter_posts("", limit=4))) == len(fake.posts)  # 40 > 3 pages x 4


def test_after_id_walks_only_newer_posts(booru, make_client) -> None:
    client = make_client(booru.url)
    newest = max(p.id for p in booru.posts)
    assert list(client.iter_posts("", after_id=newest)) == []
    added = booru.add_posts(13)
    got = [p.id for p in client.iter_posts("", after_id=newest, limit=5)]
    assert got == sorted(p.id for p in added)  # oldest first: safe to save the last id as cursor
    assert all(i > newest for i in got)
    pages = [r.query.get("page") for r in booru.requests if r.path == "/posts.json"][1:]
    assert all(pg.startswith("a") for pg in pages)


def test_after_id_resumes_from_a_saved_cursor(booru, make_client) -> None:
    client = make_client(booru.url)
    newest = max(p.id for p in booru.posts)
    added = sorted(p.id for p in booru.add_posts(9))
    first = [p.id for p in client.iter_posts("", after_id=newest, limit=4, max_posts=5)]
    rest = [p.id for p in client.iter_posts("", after_id=first[-1], limit=4)]
    assert first + rest == added


def test_new_uploads_during_a_walk_are_neither_repeated_nor_shift_pages(booru, make_client) -> None:
    client = make_client(booru.url)
    n_before = len(booru.posts)
    seen = []
    for i, post in enumerate(client.iter_posts("", limit=6)):
        seen.append(post.id)
        if i in (3, 10, 20):
            booru.add_posts(4)  # would shift offset pages and repeat posts
    assert len(seen) == len(set(seen)) == n_before


def test_before_and_after_together_is_refused(booru, make_client) -> None:
    with pytest.raises(ValueError, match="before_id or after_id"):
        list(make_client(booru.url).iter_posts("", before_id=5, after_id=1))
