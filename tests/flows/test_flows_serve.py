"""Serve the deployments and start train-lora/phase2a as a user would, through the CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXPECTED = {
    "train-lora/phase1.5", "train-lora/phase2a", "train-lora/phase2a-l2",
    "train-lora/phase2b", "dataset-refresh/nightly",
}


def _prefect(args, env, timeout=300):
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def served(prefect_api, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO_ROOT)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(BIN / "animelora"), "serve"], env=env, cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            listed = _prefect(["deployment", "ls"], env, timeout=60).stdout
            if all(name.split("/")[1] in listed for name in EXPECTED):
                break
            time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_lists_deployments_and_runs_phase2a(served, booru, tmp_path):
    env = served
    listed = _prefect(["deployment", "ls"], env).stdout
    for name in EXPECTED:
        flow, deployment = name.split("/")
        assert flow in listed and deployment in listed, listed

    nightly = _prefect(["deployment", "inspect", "dataset-refresh/nightly"], env).stdout
    assert "0 3 * * *" in nightly, nightly
    assert "'timezone': 'UTC'" in nightly, nightly  # a setting (ANIMELORA_TIMEZONE), UTC by default

    ws = tmp_path / "ws"
    run = _prefect(
        ["deployment", "run", "train-lora/phase2a", "--watch",
         "-p", f"workspace={ws}", "-p", "dataset=d", "-p", "tags=1girl", "-p", "target_size=12",
         "-p", f"booru_url={booru.url}", "-p", "model=tiny", "-p", "max_steps=4",
         "-p", "requests_per_second=10", "-p", "sample=false", "-p", "run_name=served"],
        env, timeout=420,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (ws / "runs" / "served" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_serve_without_api_url_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    out = subprocess.run([str(BIN / "animelora"), "serve"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "PREFECT_API_URL" in out.stderr
