"""The loopback server's contract: Danbooru's JSON shape, traps, skip reasons, the CLI."""
from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import urllib.request

import imagehash
import pytest
from PIL import Image

from lora.booru import skip_reason
from lora.testing.fakebooru import TRAPS, generate_posts

EXPECTED_SKIP = {
    "deleted": "deleted",
    "banned": "banned",
    "no-file-url": "no-file-url",
    "video-mp4": "not-an-image:mp4",
    "video-webm": "not-an-image:webm",
    "ugoira-zip": "not-an-image:zip",
}


def test_generate_posts_is_deterministic_and_holds_every_trap(fixture_posts) -> None:
    again = generate_posts(len(fixture_posts), seed=1)
    assert [(p.id, p.tags, p.trap) for p in again] == [(p.id, p.tags, p.trap) for p in fixture_posts]
    assert again[5].data == fixture_posts[5].data
    assert {p.trap for p in fixture_posts if p.trap} == set(TRAPS)
    with pytest.raises(ValueError, match="n: need at least"):
        generate_posts(5)


def test_skip_reason_for_each_trap(booru, make_client) -> None:
    client = make_client(booru.url)
    listed = {p.id: p for p in client.iter_posts("status:any", limit=50)}
    assert len(listed) == len(booru.posts)
    for fp in booru.posts:
        assert skip_reason(listed[fp.id]) == EXPECTED_SKIP.get(fp.trap), fp.trap
    big = next(p for p in listed.values() if skip_reason(p) is None)
    assert skip_reason(big, max_file_size=big.file_size - 1) == "file-too-large"
    assert skip_reason(big, max_pixels=big.width * big.height - 1) == "too-many-pixels"


def test_json_matches_danbooru_shape(booru, make_client) -> None:
    with urllib.request.urlopen(urllib.request.Request(
            f"{booru.url}/posts.json?tags=status:any&limit=200", headers={"User-Agent": "animelora-test/1"})) as r:
        items = json.load(r)
    assert [i["id"] for i in items] == sorted((p.id for p in booru.posts), reverse=True)
    normal = next(i for i in items if booru.post(i["id"]).trap is None)
    for key in ("id", "md5", "file_url", "large_file_url", "preview_file_url", "file_ext", "file_size",
                "image_width", "image_height", "rating", "score", "fav_count", "tag_string",
                "tag_string_general", "tag_string_character", "tag_string_copyright", "tag_string_artist",
                "tag_string_meta", "is_deleted", "is_banned", "parent_id", "has_children", "source"):
        assert key in normal, key
    assert normal["tag_string"].split() == sorted(normal["tag_string"].split())
    assert normal["rating"] in "gsqe"
    banned = next(i for i in items if booru.post(i["id"]).trap == "banned")
    assert banned["is_banned"] and "file_url" not in banned and "md5" not in banned


def test_metatag_search_semantics(booru, make_client) -> None:
    client = make_client(booru.url)
    got = {p.id for p in client.iter_posts("1girl -status:deleted rating:g,s width:>=512 height:>=512 filetype:png")}
    want = {p.id for p in booru.posts if "1girl" in p.tags and not p.is_deleted and p.rating in "gs"
            and p.width >= 512 and p.height >= 512 and p.file_ext == "png"}
    assert got == want and got


def _phash(data: bytes) -> imagehash.ImageHash:
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    bg = Image.new("RGBA", im.size, "white")
    bg.alpha_composite(im)
    return imagehash.phash(bg.convert("RGB"))


def test_duplicate_traps_are_near_and_ordinary_posts_far(fixture_posts) -> None:
    by_id = {p.id: p for p in fixture_posts}
    for p in fixture_posts:
        if p.duplicate_of:
            assert _phash(p.data) - _phash(by_id[p.duplicate_of].data) <= 4, p.trap
    dup_exact = next(p for p in fixture_posts if p.trap == "dup-exact")
    assert dup_exact.md5 == by_id[dup_exact.duplicate_of].md5 and dup_exact.id != dup_exact.duplicate_of
    resized = next(p for p in fixture_posts if p.trap == "near-resize")
    assert min(Image.open(io.BytesIO(resized.data)).size) >= 512
    hashes = [_phash(p.data) for p in fixture_posts if p.trap is None]
    assert min(a - b for a, b in itertools.combinations(hashes, 2)) > 10


def test_image_traps_have_the_promised_defects(fixture_posts) -> None:
    t = {p.trap: p for p in fixture_posts if p.trap}
    assert Image.open(io.BytesIO(t["rgba"].data)).mode == "RGBA"
    assert Image.open(io.BytesIO(t["palette"].data)).mode == "P"
    assert Image.open(io.BytesIO(t["cmyk"].data)).mode == "CMYK"
    assert getattr(Image.open(io.BytesIO(t["animated-gif"].data)), "n_frames", 1) > 1
    assert min(Image.open(io.BytesIO(t["small"].data)).size) < 512
    with pytest.raises(OSError):
        Image.open(io.BytesIO(t["corrupt"].data))
    with pytest.raises(OSError):
        Image.open(io.BytesIO(t["truncated"].data)).load()
    assert t["md5-mismatch"].md5 != t["md5-mismatch"].real_md5
    assert t["corrupt"].md5 == t["corrupt"].real_md5


def test_cli_runs_in_the_foreground() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lora.testing.fakebooru", "--port", "0", "--posts", "20",
                             "--seed", "3"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("fakebooru listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        req = urllib.request.Request(f"{url}/posts.json?limit=3", headers={"User-Agent": "animelora-test/1"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert len(json.load(r)) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)
