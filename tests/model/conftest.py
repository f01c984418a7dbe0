"""Shared fixtures for the model tests: the tiny model is built once per session.

The root conftest points ANIMELORA_CACHE at a per-session temporary folder, so
``ensure_tiny_model()`` here never touches the user's cache.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from lora.model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture()
def tiny_components(tiny_path):
    from lora.model import load_components

    return load_components("tiny")
