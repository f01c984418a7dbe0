"""manifest.parquet, versions/ and state.json: atomic, immutable, validated."""
from __future__ import annotations

import json

import pytest

from lora.data.manifest import (
    DatasetBusyError,
    DatasetPaths,
    ManifestError,
    dataset_lock,
    load_rows,
    new_row,
    save_rows,
)
from lora.data.state import DatasetState, QueryCursor, StateError, load_state, save_state
from lora.data.versions import VersionError, list_versions, read_version, write_version


def test_manifest_roundtrip_is_atomic_and_validated(workspace):
    paths = DatasetPaths.of(workspace, "m").ensure()
    rows = [new_row("1", "kept", file="images/1.png", md5="a" * 32, post_id=1),
            new_row("2", "duplicate", reason="duplicate-of:1", duplicate_of="1")]
    save_rows(paths, rows)
    back = load_rows(paths)
    assert [r["id"] for r in back] == ["1", "2"] and back[1]["duplicate_of"] == "1"
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".manifest")]
    with pytest.raises(ManifestError, match="twice"):
        save_rows(paths, rows + [rows[0]])
    with pytest.raises(ManifestError, match="status"):
        new_row("3", "maybe")
    with pytest.raises(ManifestError, match="unknown manifest field"):
        new_row("3", "kept", file="x", colour="red")
    assert len(load_rows(paths)) == 2  # the refused writes changed nothing


def test_versions_are_written_once_and_sorted(workspace):
    paths = DatasetPaths.of(workspace, "v").ensure()
    write_version(paths, "v0001", ["5", "local-ab"], ["images/5.png", "images/local-ab.jpg"], {"q": "t"})
    write_version(paths, "v0002", ["5"], ["images/5.png"], {"q": "t"})
    assert list_versions(paths) == ["v0001", "v0002"]
    v1 = read_version(paths, "v0001")
    assert v1["post_ids"] == [5, "local-ab"] and v1["count"] == 2 and v1["parent"] is None
    assert read_version(paths)["parent"] == "v0001"
    with pytest.raises(VersionError, match="already exists"):
        write_version(paths, "v0002", [], [], {})
    with pytest.raises(VersionError, match="relative"):
        write_version(paths, "v0003", ["1"], ["/etc/passwd"], {})
    with pytest.raises(VersionError, match="no version"):
        read_version(paths, "v0009")


def test_state_roundtrip_and_reset_on_changed_query(workspace):
    paths = DatasetPaths.of(workspace, "s").ensure()
    state = DatasetState({"a": QueryCursor("sketch", "sketch rating:g", 50, 10, False)})
    save_state(paths, state)
    back = load_state(paths)
    assert back.queries["a"].newest_id == 50 and back.cursor("a", "sketch").oldest_id == 10
    assert back.cursor("a", "landscape").newest_id is None  # other tags: fresh cursor
    assert back.cursor("a", "sketch", "sketch rating:e").newest_id is None
    paths.state.write_text(json.dumps({"queries": {"a": {"tags": "x", "newest_id": "12"}}}))
    with pytest.raises(StateError, match="newest_id"):
        load_state(paths)


def test_lock_excludes_other_processes_but_is_reentrant(workspace):
    import subprocess
    import sys

    paths = DatasetPaths.of(workspace, "l").ensure()
    code = (
        "import sys\nfrom lora.data.manifest import DatasetPaths, dataset_lock, DatasetBusyError\n"
        f"p = DatasetPaths.of({str(workspace)!r}, 'l')\n"
        "try:\n    with dataset_lock(p): print('got')\nexcept DatasetBusyError as e: print('busy', e)\n"
    )
    with dataset_lock(paths):
        with dataset_lock(paths):  # same process: re-entrant
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("busy") and "'l'" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("got")
    assert DatasetBusyError


def test_dataset_names_cannot_escape_the_workspace(workspace):
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="dataset name"):
            DatasetPaths.of(workspace, bad)
