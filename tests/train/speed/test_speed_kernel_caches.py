"""The CUDA driver's kernel cache kept beside the latent and compile caches
(lora/train/speed/compile.py, ``use_driver_cache``): a new Colab session on the same workspace
gets cuDNN's run-time attention kernels from it instead of compiling them again."""
from __future__ import annotations

import torch

from lora.train.speed.compile import DRIVER_CACHE_ENV, use_driver_cache


def test_without_a_cuda_device_nothing_is_set_and_no_folder_made(tmp_path, monkeypatch):
    monkeypatch.delenv(DRIVER_CACHE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert use_driver_cache(tmp_path / "cache" / "cuda") is False
    assert DRIVER_CACHE_ENV not in __import__("os").environ
    assert not (tmp_path / "cache").exists()


def test_on_a_cuda_machine_the_driver_is_pointed_at_the_workspace_before_it_starts(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv(DRIVER_CACHE_ENV, raising=False)
    seen: list[str | None] = []
    # torch.cuda.is_available() is the call that starts the driver: the variable must be set by then
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen.append(os.environ.get(DRIVER_CACHE_ENV)) or True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    folder = tmp_path / "ws" / "cache" / "cuda"
    assert use_driver_cache(folder) is True
    assert seen == [str(folder)]
    assert os.environ[DRIVER_CACHE_ENV] == str(folder) and folder.is_dir()


def test_a_folder_the_user_chose_wins(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv(DRIVER_CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_driver_cache(tmp_path / "ws" / "cuda") is False
    assert os.environ[DRIVER_CACHE_ENV] == str(tmp_path / "mine")
    assert not (tmp_path / "ws").exists()


def test_cuda_already_started_keeps_the_drivers_folder(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv(DRIVER_CACHE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert use_driver_cache(tmp_path / "cuda") is False
    assert DRIVER_CACHE_ENV not in os.environ
