"""The CUDA driver's kernel cache and torch.compile's caches kept beside the latent cache
(lora/train/speed/compile.py, ``use_driver_cache`` and ``use_compile_cache``): a new Colab
session on the same workspace gets cuDNN's run-time attention kernels and the compiled UNet
from them instead of compiling them again."""
from __future__ import annotations

import os
import shutil

import pytest
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


# -- torch.compile's caches (use_compile_cache) ---------------------------------------------------

_COMPILE_IN_A_FRESH_PROCESS = r"""
import os, sys
from pathlib import Path
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
cache_dir()  # what importing diffusers does: torch writes its default folder into the environment
from lora.train.speed.compile import use_compile_cache
print(use_compile_cache(Path(sys.argv[1])))
print(torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor")(torch.ones(8)).sum().item())
"""


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++") or os.environ.get("CXX")),
                    reason="inductor compiles C++ on a CPU: no C++ compiler here")
def test_compiled_code_lands_in_the_workspace_although_torch_wrote_its_default_first(tmp_path):
    """The defect this guards: importing diffusers makes torch write ``/tmp/torchinductor_<user>``
    into TORCHINDUCTOR_CACHE_DIR, which was taken for the user's choice, so every new session
    compiled again (137.8 s a bucket shape on an H100, 17.0 s from the cache)."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "ws" / "cache" / "compile"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", _COMPILE_IN_A_FRESH_PROCESS, str(folder)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "True"
    assert (folder / "fxgraph").is_dir(), sorted(p.name for p in folder.iterdir())


def test_a_compile_folder_the_user_chose_wins(tmp_path, monkeypatch):
    import os

    from lora.train.speed.compile import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache(tmp_path / "ws" / "compile") is False
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert not (tmp_path / "ws").exists()


def test_torchs_own_default_is_not_taken_for_a_choice(tmp_path, monkeypatch):
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from lora.train.speed.compile import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert use_compile_cache(tmp_path / "ws" / "compile") is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ws" / "compile")


def test_a_second_run_in_the_same_process_keeps_its_compiled_code_in_its_own_workspace(tmp_path, monkeypatch):
    """A notebook trains on workspace A, then on workspace B: B's compiled code goes to B, not
    into A (the first run's folder is no choice of the user's); a folder the user sets between
    the two runs still wins."""
    from lora.train.speed import compile as compile_module

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compile_module, "_compile_dir_set_here", None)
    assert compile_module.use_compile_cache(tmp_path / "a" / "compile") is True
    assert compile_module.use_compile_cache(tmp_path / "b" / "compile") is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "b" / "compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_module.use_compile_cache(tmp_path / "c" / "compile") is False
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
