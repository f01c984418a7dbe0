"""A refresh interrupted at any point and run again neither loses nor doubles images."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lora.data.manifest import DatasetPaths, load_manifest, load_rows
from lora.data.refresh import commit, download_and_prepare, recover
from lora.data.versions import list_versions, read_version
from lora.testing.fakebooru import generate_posts


class Boom(RuntimeError):
    pass


def _consistent(paths: DatasetPaths, strays: tuple[str, ...] = ()) -> list[str]:
    """Manifest rows are unique and the kept ones are exactly the images on disk (besides
    ``strays``: files someone else put into images/, which the project never deletes)."""
    df = load_manifest(paths)
    assert df.id.is_unique
    kept = sorted(df[df.status == "kept"].file)
    on_disk = sorted(f"images/{p.name}" for p in paths.images.iterdir()
                     if p.suffix != ".txt" and p.name not in strays)
    captions = sorted(f"images/{p.name}" for p in paths.images.iterdir() if p.suffix == ".txt")
    assert kept == on_disk
    assert captions == sorted(str(Path(f).with_suffix(".txt")) for f in kept)
    assert sorted(read_version(paths)["files"]) == kept
    return kept


def test_interrupted_download_then_rerun_loses_and_doubles_nothing(booru_factory, fetch, workspace):
    server = booru_factory(generate_posts(30, seed=21))
    done = []

    def explode_after_six(event):
        done.append((event["id"], event["status"]))
        if len(done) == 6:
            raise Boom("simulated crash mid-download")

    with pytest.raises(Boom):
        fetch(server, on_progress=explode_after_six)
    paths = DatasetPaths.of(workspace, "d")
    assert not paths.manifest.exists() and not paths.state.exists() and list_versions(paths) == []
    (paths.images / "424242.png").write_bytes(b"stray file from nowhere")
    fetched_before = Counter(r.path for r in server.requests if r.path.startswith("/data/"))

    summary = fetch(server)
    kept = _consistent(paths, strays=("424242.png",))
    assert summary.version == "v0001" and summary.total_kept == len(kept)
    # A file the project did not put there is in no version, and is never deleted (the write policy).
    assert "images/424242.png" not in kept
    assert (paths.images / "424242.png").read_bytes() == b"stray file from nowhere"
    from lora.data.maintenance import check_dataset

    assert any("424242.png" in note for note in check_dataset(paths).notes)
    # Posts finished before the crash were re-used, not downloaded again (failed downloads
    # are retried on purpose).
    fetched = Counter(r.path for r in server.requests if r.path.startswith("/data/"))
    finished = [post_id for post_id, status in done[:5] if status != "failed"]
    assert len(finished) >= 4
    for post_id in finished:
        again = [p for p in fetched if p.startswith(f"/data/{post_id}.")]
        assert all(fetched[p] == fetched_before[p] for p in again), post_id
    # A third run changes nothing.
    rerun = fetch(server)
    assert rerun.kept == 0 and rerun.version is None
    assert _consistent(paths, strays=("424242.png",)) == kept


def test_crash_between_manifest_and_version_is_repaired(booru_factory, fetch, workspace):
    """Rows committed but the version file never written: the next run writes it first."""
    from lora.data.refresh import QuerySpec, collect_candidates, make_client

    server = booru_factory(generate_posts(8, seed=2, traps=False))
    paths = DatasetPaths.of(workspace, "d").ensure()
    with make_client(server.url, None, 10) as client:
        col = collect_candidates(client, paths, [QuerySpec("default", "status:any")], limit=100)
        rows = download_and_prepare(client, paths, col.candidates)
    commit(paths, col.rows + rows, col.cursors, finalize=False)  # "crash" before the version
    assert list_versions(paths) == []
    assert {r["version_added"] for r in load_rows(paths)} == {"v0001"}
    recover(paths)
    assert list_versions(paths) == ["v0001"]
    assert _consistent(paths)
    server.add_posts(2)
    assert fetch(server).version == "v0002"


def test_killed_cli_fetch_then_rerun_is_consistent(booru_factory, workspace, tmp_path):
    """SIGKILL a real `animelora fetch` process mid-download, then run it again."""
    server = booru_factory(generate_posts(30, seed=9, traps=False))
    cmd = [sys.executable, "-m", "animelora", "fetch", "--booru-url", server.url, "--tags", "status:any",
           "--limit", "30", "--workspace", str(workspace), "--dataset", "k", "--ratings", "g,s,q,e",
           "--requests-per-second", "10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANBOORU_")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pending = workspace / "datasets" / "k" / ".staging" / "rows"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if pending.is_dir() and len(list(pending.glob("*.json"))) >= 4:
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    paths = DatasetPaths.of(workspace, "k")
    assert killed, "the fetch finished before it could be killed"
    assert not paths.manifest.exists() or len(load_rows(paths)) < 30

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    kept = _consistent(paths)
    assert len(kept) == 30
    assert "kept" in out.stdout
