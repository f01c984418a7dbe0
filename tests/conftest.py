"""Session-wide test settings shared by every test folder.

- Caches (the tiny model, HF) go to a per-session temporary folder, never the user's home.
- No telemetry; nothing leaves loopback.
- `prefect_api`: ONE real temporary Prefect server for the whole session
  (`prefect_test_harness`), shared by every flow test so the server starts once.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_SESSION_TMP = None


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_TMP
    import tempfile

    _SESSION_TMP = Path(tempfile.mkdtemp(prefix="animelora-tests-"))
    os.environ.setdefault("ANIMELORA_CACHE", str(_SESSION_TMP / "cache"))
    os.environ.setdefault("HF_HOME", str(_SESSION_TMP / "hf-home"))
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def prefect_api():
    """A real temporary Prefect server for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture()
def umask_022():
    """The common umask 022 for one test (files the project creates must follow it)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)
