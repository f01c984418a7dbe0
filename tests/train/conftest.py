"""Fixtures for the training-engine tests: a small generated data set and the tiny model.

The data set (12 images in three aspect ratios, kohya-style captions, ``versions/v0001.json``)
is built once per session; runs share its latent cache as real runs on one data set do.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lora.testing.datasets import write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = [(96, 96), (128, 80), (80, 128)]


def make_dataset(root: Path, n: int = 12, seed: int = 0) -> Path:
    """A data-set folder per docs/architecture.md: images/<id>.png + .txt, versions/v0001.json."""
    return write_synthetic_dataset(root, n, SIZES, seed=seed)


#: One thread: the tiny model's ops are too small to split, and on a shared 2-core machine two
#: spinning OpenMP threads make a step about ten times slower.
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from lora.model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, tiny_model) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train-data") / "demo")


@pytest.fixture()
def tiny_cfg(dataset):
    """``resolve_config`` for the tiny model on the session data set, with extra overrides."""
    from lora.config import resolve_config

    def build(preset: str = "phase2a", **overrides):
        values = {"model": "tiny", "dataset": str(dataset), "max_steps": 8,
                  "checkpoint_every_minutes": None}
        values.update(overrides)
        return resolve_config(preset, values, None)

    return build


@pytest.fixture()
def cli_env() -> dict[str, str]:
    """Environment for `python -m animelora` subprocesses (same threads as every other run)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(THREADS)
    env["MKL_NUM_THREADS"] = str(THREADS)
    env.pop(FAKE_OOM, None)
    return env


FAKE_OOM = "ANIMELORA_FAKE_OOM_AT_STEP"
PYTHON = sys.executable
