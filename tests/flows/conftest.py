"""Fixtures for the flow tests: a loopback Danbooru, a per-test workspace, `animelora serve`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora.testing.fakebooru import FakeDanbooru, generate_posts


@pytest.fixture(scope="module")
def booru():
    """A Danbooru-compatible server with enough clean posts for a tiny run (traps included)."""
    with FakeDanbooru(generate_posts(80, seed=7)) as server:
        yield server


@pytest.fixture()
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture()
def flow_params(workspace, booru):
    """Builds the demo-sized parameters every flow test starts from, by group (flows/params.py):
    ``flow_params(training={"run_name": "x"})`` changes only the fields it names."""
    base = {
        "data": {"workspace": str(workspace), "dataset": "demo", "tags": "1girl", "target_size": 12,
                 "booru_url": booru.url, "requests_per_second": 10.0},
        "training": {"model": "tiny", "max_steps": 8},
        "results": {"sample": False},
    }

    def build(**groups):
        assert set(groups) <= set(base), f"unknown parameter group(s): {set(groups) - set(base)}"
        return {name: {**fields, **groups.get(name, {})} for name, fields in base.items()}

    return build


REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: every deployment `animelora serve` serves
SERVED = {
    "train-lora/phase1.5", "train-lora/phase2a", "train-lora/phase2a-l2",
    "train-lora/phase2b", "dataset-refresh/nightly",
}


def run_prefect(args, env, timeout=300):
    """The `prefect` command line, as a user runs it from the repository."""
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def prefect_cli():
    """:func:`run_prefect`, for tests (conftest modules are not importable by name here)."""
    return run_prefect


@pytest.fixture()
def served(prefect_api, tmp_path):
    """`animelora serve` against the test server, once every deployment is listed; yields the
    environment that reaches it."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO_ROOT)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(BIN / "animelora"), "serve"], env=env, cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            listed = run_prefect(["deployment", "ls"], env, timeout=60).stdout
            if all(name.split("/")[1] in listed for name in SERVED):
                break
            time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
