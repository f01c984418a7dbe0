"""Concurrent downloads (issue 26): a few files at once, never more than the per-host limit on
one file host, a stopped fetch cuts what is in flight, and a fetch's results (kept images,
manifest rows) do not depend on the order in which downloads finish."""
from __future__ import annotations

import time

import pandas as pd

from lora.booru import FileJob
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.refresh import QuerySpec, refresh_dataset
from lora.testing.fakebooru import FakeDanbooru, generate_posts


def _jobs(client, posts, folder):
    listed = {p.id: p for p in client.get_posts("status:any", limit=50)}
    return [FileJob(p.id, listed[p.id], folder / p.filename) for p in posts]


def test_files_download_side_by_side_within_the_per_host_limit(make_booru, make_client, tmp_path) -> None:
    posts = generate_posts(8, seed=26, traps=False)
    # half the files come from a second host name of the same server
    fake = make_booru(posts=posts, file_delays={p.id: 0.4 for p in posts},
                      file_urls={p.id: "http://localhost:{port}/data/" + p.filename for p in posts[::2]})
    client = make_client(fake.url, max_connections_per_host=2, file_hosts=["localhost"])
    jobs = _jobs(client, posts, tmp_path)
    t0 = time.monotonic()
    results = dict(client.download_many(jobs, workers=4))
    took = time.monotonic() - t0
    assert {pid: path.read_bytes() for pid, path in results.items()} == {p.id: p.data for p in posts}
    assert fake.peak_file_connections == {"127.0.0.1": 2, "localhost": 2}
    assert took < 8 * 0.4 * 0.6  # one at a time would take 3.2 s


def test_one_host_never_gets_more_connections_than_its_limit(make_booru, make_client, tmp_path) -> None:
    posts = generate_posts(6, seed=27, traps=False)
    fake = make_booru(posts=posts, file_delays={p.id: 0.2 for p in posts})
    client = make_client(fake.url, max_connections_per_host=1)
    results = dict(client.download_many(_jobs(client, posts, tmp_path), workers=4))
    assert all(not isinstance(r, Exception) for r in results.values())
    assert fake.peak_file_connections == {"127.0.0.1": 1}


def test_leaving_early_cuts_the_downloads_in_flight(make_booru, make_client, tmp_path) -> None:
    posts = generate_posts(6, seed=28, traps=False)
    fake = make_booru(posts=posts, trickle_ids={p.id for p in posts[1:]}, trickle_interval_s=0.1)
    client = make_client(fake.url, stall_min_rate=0)  # only the default 60 s deadline would end them
    downloads = client.download_many(_jobs(client, posts, tmp_path), workers=3)
    key, first = next(downloads)
    assert key == posts[0].id and first.read_bytes() == posts[0].data
    t0 = time.monotonic()
    downloads.close()
    assert time.monotonic() - t0 < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [posts[0].filename]  # no partial files


def _fetch(fake: FakeDanbooru, ws, events=None):
    summary = refresh_dataset(ws, "d", [QuerySpec("default", "status:any")], booru_url=fake.url,
                              ratings=("g", "s", "q", "e"), requests_per_second=10, backoff_base=0.01,
                              limit=100, on_progress=events.append if events is not None else None)
    paths = DatasetPaths.of(ws, "d")
    # times, and the held-out split drawn from a salt that each data set picks at random
    manifest = load_manifest(paths).drop(columns=["seen_at", "committed_at", "split"])
    manifest["file_url"] = manifest["file_url"].str.replace(fake.url, "", regex=False)  # the port
    images = {p.name: p.read_bytes() for p in sorted((paths.root / "images").iterdir())}
    return summary, manifest, images


def test_fetch_results_do_not_depend_on_the_download_order(tmp_path) -> None:
    posts = generate_posts(24, seed=26)  # with traps: near and exact duplicates, bad files
    with FakeDanbooru(list(posts)) as fake:
        _, manifest, images = _fetch(fake, tmp_path / "a")
    # The same posts, but the first listed answer last: downloads finish in another order.
    delays = {p.id: 0.03 * i for i, p in enumerate(sorted(posts, key=lambda p: p.id))}
    events: list[dict] = []
    with FakeDanbooru(list(posts), file_delays=delays) as slow:
        summary, manifest2, images2 = _fetch(slow, tmp_path / "b", events)
    order = [e["id"] for e in events]
    assert order != sorted(order, key=lambda pid: -int(pid))  # not newest first, as listed
    assert [e["done"] for e in events] == list(range(1, len(events) + 1))
    assert {e["total"] for e in events} == {len(events)}
    pd.testing.assert_frame_equal(manifest.reset_index(drop=True), manifest2.reset_index(drop=True))
    assert images == images2
    assert summary.kept > 10 and summary.duplicates >= 3
