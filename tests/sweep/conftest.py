"""Fixtures for the sweep tests: a workspace with a 30-image data set (6 held out: enough for
a paired interval) and the tiny model, one torch thread (the same numbers in every run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora.testing.datasets import write_synthetic_dataset


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: The held-out images are chosen by a salt the data set draws once at random; a fixed one makes
#: every workspace of these tests hold out the same 3 images, so two sweeps compare alike.
SPLIT = {"salt": "sweep-tests", "fraction": 0.2}


def make_workspace(root: Path) -> Path:
    """``root/ws`` with ``datasets/demo``: 30 small images, 24 train and 6 held out, the same
    pixels and the same held-out images every time."""
    ws = root / "ws"
    dataset = ws / "datasets" / "demo"
    dataset.mkdir(parents=True)
    (dataset / "split.json").write_text(json.dumps(SPLIT))
    write_synthetic_dataset(dataset, 30, [(64, 64)])
    return ws


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    return make_workspace(tmp_path)
