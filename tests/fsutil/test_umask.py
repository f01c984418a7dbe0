"""What the project creates follows the umask: other users (an A1111/ComfyUI container, a Prefect
worker under another uid) can read data sets, LoRA files and samples, as with ``open()``/``mkdir``."""
from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
from PIL import Image

from lora.fsutil import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, make_temp_dir, swap_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_under(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of every file and folder below ``root``."""
    return {str(p.relative_to(root)): _mode(p) for p in sorted(root.rglob("*"))}


def test_atomic_writes_and_temp_folders_follow_the_umask(tmp_path, umask_022):
    assert _mode(atomic_write_bytes(tmp_path / "a.bin", b"x")) == 0o644
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
    assert _mode(atomic_write_json(tmp_path / "a.json", {"x": 1}, exclusive=True)) == 0o644
    assert _mode(atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"y"))) == 0o644
    built = make_temp_dir(tmp_path, ".out.tmp-")
    assert built.name.startswith(".out.tmp-") and _mode(built) == 0o755
    (built / "f.txt").write_text("x")
    swap_dir(built, tmp_path / "out")
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "f.txt") == 0o644
    assert make_temp_dir(tmp_path, ".out.tmp-") != built  # a fresh name each time


def test_imported_data_set_follows_the_umask(tmp_path, umask_022):
    from lora.data.importer import import_folder

    src = tmp_path / "mine"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        blocks = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(blocks, "RGB").resize((640, 640), Image.Resampling.BICUBIC).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text("1girl, solo\n")
    summary = import_folder(tmp_path / "ws", "mine", src)
    assert summary.kept == 2
    root = tmp_path / "ws" / "datasets" / "mine"
    modes = {k: v for k, v in modes_under(root).items() if not k.endswith(".lock")}
    files = {k: v for k, v in modes.items() if (root / k).is_file()}
    folders = {k: v for k, v in modes.items() if (root / k).is_dir()}
    assert "manifest.parquet" in files and any(k.endswith(".txt") for k in files)
    assert set(files.values()) == {0o644}, files
    assert set(folders.values()) == {0o755}, folders
