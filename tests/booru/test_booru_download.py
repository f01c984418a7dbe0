"""Downloads: md5-verified, atomic, retried, never leaving partial files; not throttled."""
from __future__ import annotations

import hashlib
import time

import pytest

from lora.booru import DownloadError, Post


def _post(client, fake, trap):
    wanted = next(p for p in fake.posts if p.trap == trap)
    return next(p for p in client.get_posts(f"id:{wanted.id} status:any", limit=1))


def test_download_verifies_md5_and_writes_the_file(booru, make_client, tmp_path) -> None:
    client = make_client(booru.url)
    post = next(p for p in client.get_posts("1girl -status:deleted", limit=10) if booru.post(p.id).trap is None)
    dest = client.download(post, tmp_path / "img" / f"{post.id}.{post.file_ext}")
    assert hashlib.md5(dest.read_bytes()).hexdigest() == post.md5
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_flaky_download_is_retried(make_booru, make_client, tmp_path) -> None:
    victim = next(p for p in make_booru().posts if p.trap is None)
    fake = make_booru(flaky_download_ids={victim.id})
    client = make_client(fake.url)
    post = client.get_posts(f"id:{victim.id}", limit=1)[0]
    dest = client.download(post, tmp_path / "x.png")
    assert dest.read_bytes() == victim.data
    gets = [r for r in fake.requests if r.path == f"/data/{victim.filename}"]
    assert len(gets) == 2  # first one dropped half-way


def test_md5_mismatch_fails_without_leaving_anything(booru, make_client, tmp_path) -> None:
    client = make_client(booru.url)
    post = _post(client, booru, "md5-mismatch")
    with pytest.raises(DownloadError) as info:
        client.download(post, tmp_path / "bad.png", retries=2)
    assert info.value.reason == "md5-mismatch"
    assert list(tmp_path.iterdir()) == []  # no file, no temp file
    assert len([r for r in booru.requests if r.path.startswith("/data/")]) == 3


def test_existing_file_is_not_clobbered_by_a_failed_download(booru, make_client, tmp_path) -> None:
    client = make_client(booru.url)
    post = _post(client, booru, "md5-mismatch")
    dest = tmp_path / "keep.png"
    dest.write_bytes(b"previous good bytes")
    with pytest.raises(DownloadError):
        client.download(post, dest, retries=0)
    assert dest.read_bytes() == b"previous good bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_http_404_is_not_retried(booru, make_client, tmp_path) -> None:
    client = make_client(booru.url)
    with pytest.raises(DownloadError) as info:
        client.download(f"{booru.url}/data/999999.png", tmp_path / "nope.png")
    assert info.value.reason == "http-404"
    assert len(booru.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_post_without_file_url(make_client, booru, tmp_path) -> None:
    client = make_client(booru.url)
    banned = _post(client, booru, "banned")
    assert banned.file_url is None and banned.md5 is None
    with pytest.raises(DownloadError) as info:
        client.download(banned, tmp_path / "b.jpg")
    assert info.value.reason == "no-file-url"


def test_downloads_are_not_throttled_by_the_api_rate(booru, make_client, tmp_path) -> None:
    client = make_client(booru.url, requests_per_second=1)
    posts = client.get_posts("-status:deleted filetype:png,jpg,webp", limit=6)
    normal = [p for p in posts if booru.post(p.id).trap is None][:4]
    t0 = time.monotonic()
    for p in normal:
        client.download(p, tmp_path / f"{p.id}.{p.file_ext}")
    assert time.monotonic() - t0 < 0.9  # 4 downloads at 1 API request/s would take >= 3 s
    assert len(list(tmp_path.iterdir())) == len(normal)


def test_download_by_url_with_explicit_md5(booru, make_client, tmp_path) -> None:
    client = make_client(booru.url)
    fp = next(p for p in booru.posts if p.trap is None)
    path = client.download(f"/data/{fp.filename}", tmp_path / "u.bin", md5=fp.real_md5)
    assert path.read_bytes() == fp.data
    with pytest.raises(DownloadError, match="md5"):
        client.download(f"/data/{fp.filename}", tmp_path / "v.bin", md5="0" * 32, retries=0)
    assert not (tmp_path / "v.bin").exists()


def test_post_json_roundtrip_and_tolerance() -> None:
    p = Post.from_json({"id": 7})
    assert p.md5 is None and p.file_url is None and p.tags_general == [] and p.width == 0
    full = Post.from_json({
        "id": "12", "md5": "ab" * 16, "file_url": "https://cdn.example/x/ab.PNG", "image_width": 640,
        "image_height": 832, "file_size": 1234, "rating": "s", "tag_string_general": "1girl smile ^_^",
        "tag_string_meta": "highres", "parent_id": None, "is_deleted": False, "score": "5",
    })
    assert full.file_ext == "png" and full.width == 640 and full.tags_general == ["1girl", "smile", "^_^"]
    assert Post.from_json(full.to_json()) == full
    with pytest.raises(ValueError, match="'id'"):
        Post.from_json({"md5": "x"})
