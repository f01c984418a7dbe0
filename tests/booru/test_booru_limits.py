"""What the client refuses to read: oversized bodies, foreign hosts and schemes, redirects off
the allowed hosts, and malformed posts (skipped, the rest of the page goes on)."""
from __future__ import annotations

import time

import pytest

from lora.booru import DanbooruClient, DownloadError, MalformedPost


def _ordinary(fake, k: int = 0):
    return [p for p in fake.posts if p.trap is None][k]


def test_a_body_far_over_the_declared_size_is_cut_off_and_not_retried(make_booru, make_client, tmp_path):
    victim = _ordinary(make_booru())
    fake = make_booru(oversize_ids={victim.id})
    client = make_client(fake.url)
    post = client.get_posts(f"id:{victim.id}", limit=1)[0]
    assert 0 < post.file_size < 2 * 1024 * 1024
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        client.download(post, tmp_path / "x.png")
    assert info.value.reason == "oversized"
    gets = [r for r in fake.requests if r.path == f"/data/{victim.filename}"]
    assert len(gets) == 1                                   # not retried
    assert gets[0].bytes_sent < 40 * 1024 * 1024            # of the 300 MB the server offered
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []                   # nothing left behind


def test_the_global_cap_applies_when_the_size_is_unknown(make_booru, make_client, tmp_path):
    victim = _ordinary(make_booru())
    fake = make_booru(oversize_ids={victim.id}, oversize_bytes=3 * 1024 * 1024)
    client = make_client(fake.url, max_download_bytes=1024 * 1024)
    with pytest.raises(DownloadError) as info:
        client.download(f"{fake.url}/data/{victim.filename}", tmp_path / "x.png")
    assert info.value.reason == "oversized"
    # an honest file under the cap still downloads by URL
    other = _ordinary(fake, 1)
    assert client.download(f"{fake.url}/data/{other.filename}", tmp_path / "y.png").read_bytes() == other.data


@pytest.mark.parametrize("template,reason", [
    ("file:///etc/passwd", "unsupported-url-scheme:file"),
    ("ftp://127.0.0.1:{port}/data/x.png", "unsupported-url-scheme:ftp"),
    ("http://localhost:{port}/data/ID.png", "file-host-not-allowed:localhost"),
])
def test_file_urls_off_the_booru_are_refused_with_their_reason(make_booru, make_client, tmp_path, template, reason):
    victim = _ordinary(make_booru())
    fake = make_booru(file_urls={victim.id: template.replace("ID", str(victim.id))})
    client = make_client(fake.url)
    post = client.get_posts(f"id:{victim.id}", limit=1)[0]
    with pytest.raises(DownloadError) as info:
        client.download(post, tmp_path / "x.png")
    assert info.value.reason == reason
    assert not [r for r in fake.requests if r.path.startswith("/data/")]  # nothing was requested


def test_an_allowed_file_host_is_fetched(make_booru, make_client, tmp_path):
    victim = _ordinary(make_booru())
    fake = make_booru(file_urls={victim.id: f"http://localhost:{{port}}/data/{victim.filename}"})
    client = make_client(fake.url, file_hosts=["LOCALHOST"])
    post = client.get_posts(f"id:{victim.id}", limit=1)[0]
    assert client.download(post, tmp_path / "x.png").read_bytes() == victim.data
    wildcard = make_client(fake.url, file_hosts=["*.example.org"])
    assert wildcard.file_host_allowed("img.example.org") and not wildcard.file_host_allowed("example.org.evil")


def test_redirects_are_checked_hop_by_hop(make_booru, make_client, tmp_path):
    posts = [p for p in make_booru().posts if p.trap is None]
    a, b = posts[0], posts[1]
    fake = make_booru(redirects={a.id: f"http://localhost:{{port}}/data/{b.filename}",
                                 b.id: f"/data/{posts[2].filename}"})
    client = make_client(fake.url)
    with pytest.raises(DownloadError) as info:
        client.download(client.get_posts(f"id:{a.id}", limit=1)[0], tmp_path / "a.png")
    assert info.value.reason == "file-host-not-allowed:localhost"
    assert not [r for r in fake.requests if r.path == f"/data/{b.filename}"]
    # a redirect on the booru's own host is followed (md5 given for the target's bytes)
    dest = client.download(f"{fake.url}/data/{b.filename}", tmp_path / "b.png", md5=posts[2].md5)
    assert dest.read_bytes() == posts[2].data


def test_danbooru_cdn_hosts_are_known():
    with DanbooruClient("https://danbooru.donmai.us") as client:
        assert client.file_host_allowed("cdn.donmai.us")
        assert not client.file_host_allowed("donmai.us.evil.example")
        assert not client.file_host_allowed("example.com")
    with pytest.raises(ValueError, match="file host"):
        DanbooruClient("https://danbooru.donmai.us", file_hosts=["https://x.org/path"])


def test_a_malformed_post_is_skipped_and_the_page_goes_on(make_booru, make_client):
    raw = [{"id": "not-a-number", "md5": "x"}, {"id": 7, "tag_string_general": 5}, ["not", "a", "post"]]
    fake = make_booru(raw_items=raw)
    client = make_client(fake.url)
    bad: list[MalformedPost] = []
    posts = list(client.iter_posts("status:any", limit=10, on_malformed=bad.append))
    assert len(posts) == len(fake.posts)                     # every real post still listed
    fields = {(b.field, b.post_id) for b in bad}
    assert {("id", None), ("tags", 7), ("post", None)} <= fields
    assert len({b.key for b in bad}) == 3                    # stable, distinct keys
    assert {b.key for b in bad} == {b.key for b in bad[:3]}  # the same items on every page
