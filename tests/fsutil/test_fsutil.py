"""lora.fsutil: atomic writes never leave half a file or a temporary behind; swap_dir never loses a folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from lora.fsutil import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_digest,
    swap_dir,
)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.bin"
    assert atomic_write_bytes(target, b"one") == target  # parent folder is created
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _entries(target.parent) == ["data.bin"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old\n")
    seen: list[Path] = []

    def half_then_crash(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_crash, prefix=".state.", suffix=".json.tmp")
    assert target.read_text() == "old\n"
    assert _entries(tmp_path) == ["state.json"]
    # the temporary was a hidden sibling with the requested name parts
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".state.") and seen[0].name.endswith(".json.tmp")


def test_keyboard_interrupt_also_removes_the_temporary(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.bin", interrupted)
    assert _entries(tmp_path) == []


def test_unserialisable_json_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert _entries(tmp_path) == ["m.json"]


def test_json_round_trip_and_format(tmp_path: Path) -> None:
    obj = {"version": "v3", "ids": [1, 2, 3], "nested": {"ok": True, "none": None}, "name": "café"}
    target = atomic_write_json(tmp_path / "v.json", obj)
    assert json.loads(target.read_text(encoding="utf-8")) == obj
    # indent=1 plus a final newline, as every JSON file of a data set and a run is written
    assert target.read_text() == json.dumps(obj, indent=1) + "\n"
    atomic_write_json(target, [1], indent=None)
    assert target.read_text() == "[1]\n"


def test_text_is_written_as_given(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "r.md", "# ünïcode\n\nline\n", fsync=False)
    assert target.read_bytes() == "# ünïcode\n\nline\n".encode("utf-8")


def test_exclusive_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "v1.json"
    atomic_write_json(target, {"first": True}, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_json(target, {"first": False}, exclusive=True)
    assert json.loads(target.read_text()) == {"first": True}
    assert _entries(tmp_path) == ["v1.json"]


def test_mode_follows_the_request(tmp_path: Path) -> None:
    private = atomic_write_bytes(tmp_path / "p", b"x", mode=0o600)
    assert private.stat().st_mode & 0o777 == 0o600  # only when asked for
    umask = os.umask(0o022)
    os.umask(umask)
    shared = atomic_write_bytes(tmp_path / "s", b"x")
    assert shared.stat().st_mode & 0o777 == 0o666 & ~umask  # the default: same as open()


def _build(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_swap_dir_replaces_a_folder_and_removes_the_old_one(tmp_path: Path) -> None:
    target = _build(tmp_path / "hub", {"old.txt": "old"})
    new = _build(tmp_path / ".hub.tmp-1", {"new.txt": "new"})
    swap_dir(new, target)
    assert _entries(target) == ["new.txt"]
    assert _entries(tmp_path) == ["hub"]  # neither the build folder nor the old one is left


def test_swap_dir_into_a_missing_target(tmp_path: Path) -> None:
    new = _build(tmp_path / ".tmp-step-3", {"a": "1"})
    swap_dir(new, tmp_path / "step-3", old=tmp_path / ".old-step-3")
    assert _entries(tmp_path) == ["step-3"]


def _rebuild(target: Path, build) -> None:
    """The pattern every caller (samples, hub staging, checkpoints) uses around swap_dir."""
    tmp = target.with_name(f".{target.name}.tmp-test")
    tmp.mkdir()
    try:
        build(tmp)
        swap_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def test_swap_dir_keeps_the_old_folder_when_the_build_fails(tmp_path: Path) -> None:
    target = _build(tmp_path / "samples", {"grid.png": "old grid"})

    def crash(tmp: Path) -> None:
        (tmp / "half.png").write_text("...")
        raise RuntimeError("sampling crashed")

    with pytest.raises(RuntimeError, match="sampling crashed"):
        _rebuild(target, crash)
    assert _entries(target) == ["grid.png"] and (target / "grid.png").read_text() == "old grid"
    assert _entries(tmp_path) == ["samples"]
    _rebuild(target, lambda tmp: (tmp / "grid.png").write_text("new grid"))
    assert (target / "grid.png").read_text() == "new grid"
    assert _entries(tmp_path) == ["samples"]


def test_swap_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path: Path) -> None:
    target = _build(tmp_path / "samples", {"grid.png": "old grid"})
    with pytest.raises(FileNotFoundError):
        swap_dir(tmp_path / ".never-built", target)
    assert (target / "grid.png").read_text() == "old grid"
    assert _entries(tmp_path) == ["samples"]


def test_swap_dir_clears_a_stale_old_folder(tmp_path: Path) -> None:
    target = _build(tmp_path / "step-5", {"a": "current"})
    _build(tmp_path / ".old-step-5", {"junk": "from a crash"})
    new = _build(tmp_path / ".tmp-step-5", {"a": "new"})
    swap_dir(new, target, old=tmp_path / ".old-step-5")
    assert (target / "a").read_text() == "new"
    assert _entries(tmp_path) == ["step-5"]


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_file_digest_matches_hashlib(tmp_path: Path, algo: str) -> None:
    data = os.urandom((1 << 20) + 12345)  # more than one read block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_digest(path, algo) == hashlib.new(algo, data).hexdigest()
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
