"""A file server that trickles bytes (issue 23): each byte resets the read timeout, so only a
per-file deadline and a minimum rate end the download; a fetch records the stuck file as
failed with its reason, goes on with the rest, and tries the file again next time."""
from __future__ import annotations

import time

import pytest

from animelora.cli import main as cli
from lora.booru import DownloadError
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.refresh import QuerySpec, refresh_dataset
from lora.testing.fakebooru import generate_posts


def _listed(client, fake, fake_post):
    return client.get_posts(f"id:{fake_post.id} status:any", limit=1)[0]


def _normal(fake):
    return next(p for p in fake.posts if p.trap is None)


def test_trickling_body_ends_at_the_file_deadline(make_booru, make_client, tmp_path) -> None:
    fake = make_booru()
    victim = _normal(fake)
    fake.trickle_ids.add(victim.id)
    fake.trickle_interval_s = 0.1
    # No rate floor: only the deadline can end this download (10 bytes/s never stalls).
    client = make_client(fake.url, file_deadline=1.5, stall_min_rate=0)
    post = _listed(client, fake, victim)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        client.download(post, tmp_path / "x.png")
    took = time.monotonic() - t0
    assert info.value.reason == "deadline-exceeded"
    assert 1.4 < took < 4.0
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_trickling_headers_end_at_the_file_deadline(make_booru, make_client, tmp_path) -> None:
    fake = make_booru()
    victim = _normal(fake)
    fake.trickle_header_ids.add(victim.id)
    fake.trickle_interval_s = 0.1
    client = make_client(fake.url, file_deadline=1.5, stall_min_rate=0)
    post = _listed(client, fake, victim)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        client.download(post, tmp_path / "x.png")
    assert info.value.reason == "deadline-exceeded"
    assert time.monotonic() - t0 < 4.0


def test_a_transfer_below_the_rate_floor_is_a_stall(make_booru, make_client, tmp_path) -> None:
    fake = make_booru()
    victim = _normal(fake)
    fake.trickle_ids.add(victim.id)
    fake.trickle_interval_s = 0.05  # ~20 bytes/s, under the 200 bytes/s floor
    client = make_client(fake.url, stall_timeout=0.5, stall_min_rate=200)
    post = _listed(client, fake, victim)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        client.download(post, tmp_path / "x.png", retries=0)
    assert info.value.reason == "stalled"
    assert time.monotonic() - t0 < 2.5


def test_default_deadline_grows_with_the_file_size(make_client, booru) -> None:
    client = make_client(booru.url)
    assert client.deadline_for(100_000) == 60.0
    assert client.deadline_for(20 * 2**20) == pytest.approx((20 * 2**20 + 0.01 * 20 * 2**20) / 65536)
    assert make_client(booru.url, file_deadline=5).deadline_for(20 * 2**20) == 5


def test_fetch_records_the_stuck_file_goes_on_and_retries_it_later(booru_factory_posts, tmp_path) -> None:
    fake, posts = booru_factory_posts
    stuck = posts[3]
    fake.trickle_ids.add(stuck.id)
    fake.trickle_interval_s = 0.2
    ws = tmp_path / "ws"

    def fetch():
        return refresh_dataset(ws, "d", [QuerySpec("default", "status:any")], booru_url=fake.url,
                               ratings=("g", "s", "q", "e"), requests_per_second=10, backoff_base=0.01,
                               limit=100, file_timeout_s=1.5)

    t0 = time.monotonic()
    summary = fetch()
    assert time.monotonic() - t0 < 15
    df = load_manifest(DatasetPaths.of(ws, "d")).set_index("id")
    assert df.loc[str(stuck.id), "status"] == "failed"
    assert df.loc[str(stuck.id), "reason"] == "deadline-exceeded"
    assert summary.kept == len(posts) - 1 and summary.failed == 1

    fake.trickle_ids.clear()  # the server recovers: the next fetch downloads the file
    again = fetch()
    df = load_manifest(DatasetPaths.of(ws, "d")).set_index("id")
    assert again.kept == 1 and df.loc[str(stuck.id), "status"] == "kept"


def test_cli_file_timeout(booru_factory_posts, tmp_path, capsys) -> None:
    fake, posts = booru_factory_posts
    fake.trickle_ids.add(posts[1].id)
    fake.trickle_interval_s = 0.2
    base = ["fetch", "--booru-url", fake.url, "--tags", "status:any", "--ratings", "g,s,q,e",
            "--requests-per-second", "10", "--workspace", str(tmp_path / "ws"), "--dataset", "c", "--json"]
    assert cli(base + ["--file-timeout", "0"]) == 2
    assert "--file-timeout" in capsys.readouterr().err
    assert cli(base + ["--file-timeout", "1"]) == 0
    out = capsys.readouterr().out
    assert '"failed": 1' in out and "deadline-exceeded" in out


@pytest.fixture
def booru_factory_posts(make_booru):
    posts = generate_posts(6, seed=23, traps=False)
    return make_booru(posts=posts), posts
