"""Training caches never go inside the data set: a read-only data set trains, and nothing appears in it."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from animelora.cli import main
from lora.train.data.cache import compiled_code_root, train_cache_root

from lora.testing.datasets import write_synthetic_dataset


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~0o222)


def test_cache_root_order(tmp_path, monkeypatch):
    ws_data = tmp_path / "ws" / "datasets" / "anime"
    ws_data.mkdir(parents=True)
    plain = tmp_path / "downloads" / "anime"
    plain.mkdir(parents=True)
    monkeypatch.delenv("ANIMELORA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert train_cache_root(ws_data) == tmp_path / "ws" / "cache" / "train"
    assert train_cache_root(plain) == tmp_path / "home" / ".cache" / "animelora" / "train"
    monkeypatch.setenv("ANIMELORA_CACHE", str(tmp_path / "shared"))
    assert train_cache_root(ws_data) == tmp_path / "shared" / "train"
    assert train_cache_root(plain, tmp_path / "mine") == tmp_path / "mine"
    for root in (train_cache_root(ws_data), train_cache_root(plain)):
        assert ws_data not in root.parents and plain not in root.parents


def test_compiled_code_goes_beside_the_latent_cache_but_never_outside_a_named_cache_dir(tmp_path, monkeypatch):
    ws_data = tmp_path / "ws" / "datasets" / "anime"
    ws_data.mkdir(parents=True)
    monkeypatch.delenv("ANIMELORA_CACHE", raising=False)
    assert compiled_code_root(ws_data) == tmp_path / "ws" / "cache"  # cache/train, cache/compile, cache/cuda
    monkeypatch.setenv("ANIMELORA_CACHE", str(tmp_path / "shared"))
    assert compiled_code_root(ws_data) == tmp_path / "shared"
    # cache_dir names the folder itself: compile/ and cuda/ go inside it, not into its parent
    assert compiled_code_root(ws_data, tmp_path / "disk" / "mine") == tmp_path / "disk" / "mine"


def test_read_only_data_set_trains_and_stays_untouched(tmp_path, tiny_model, monkeypatch, capsys):
    # the README's layout: <workspace>/datasets/<name>; caches go to <workspace>/cache
    monkeypatch.delenv("ANIMELORA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from lora.model import tiny

    monkeypatch.setattr(tiny, "default_cache_root", lambda: tiny_model.parent)  # the session's tiny model
    data = write_synthetic_dataset(tmp_path / "ws" / "datasets" / "demo", 6, [(96, 96), (128, 80)], seed=3)
    before = _tree(data)
    _chmod_tree(data, writable=False)
    try:
        if os.geteuid() != 0:  # root writes through permissions: then only "nothing appears" is checked
            with pytest.raises(PermissionError):
                (data / "probe").write_text("x")
        code = main(["train", "--dataset", str(data), "--run-dir", str(tmp_path / "ws" / "runs" / "r"),
                     "--model", "tiny", "--max-steps", "2", "-q"])
        assert code == 0, capsys.readouterr().err
    finally:
        _chmod_tree(data, writable=True)
    assert _tree(data) == before  # nothing written, created or touched inside the data set
    cached = list((tmp_path / "ws" / "cache" / "train").rglob("*.safetensors"))
    assert len(cached) >= 6  # latents of every image and the caption embeddings
