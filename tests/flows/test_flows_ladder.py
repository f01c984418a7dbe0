"""The guide's ladder through the served deployments: phase1.5, then phase2a on the same data set;
the phase2a run compares with the phase1.5 run without being told to."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora.data.split import load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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
            if "phase1.5" in listed and "phase2a" in listed:
                break
            time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_phase2a_compares_with_phase1_5_without_being_told(served, booru, tmp_path):
    ws = tmp_path / "ws"
    # a data set that holds out a quarter of its images, so 12 images give 3 to pair on
    load_settings(ws / "datasets" / "d", 0.25)
    common = ["-p", f"workspace={ws}", "-p", "dataset=d", "-p", "tags=1girl", "-p", "target_size=12",
              "-p", f"booru_url={booru.url}", "-p", "model=tiny", "-p", "max_steps=2",
              "-p", "requests_per_second=10", "-p", "sample=false"]
    for rung in ("phase1.5", "phase2a"):
        run = _prefect(["deployment", "run", f"train-lora/{rung}", "--watch", *common], served, timeout=420)
        assert run.returncode == 0, run.stdout + run.stderr

    report = ws / "runs" / "d-phase2a" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    gate = metrics["gate_comparison"]
    assert gate["against"] == "compared run d-phase1-5" and gate["status"] == "ok"
    assert gate["shared_images"] == 3 and gate["low"] <= gate["diff"] <= gate["high"]
    rungs = metrics["ladder"]["rungs"]
    assert [(r["preset"], r["run"]) for r in rungs] == [("phase1.5", "d-phase1-5"), ("phase2a", "d-phase2a")]
    assert rungs[1]["previous"] == "d-phase1-5" and rungs[1]["vs_previous"]["status"] == "ok"
    assert all(r["vs_base_model"]["status"] == "ok" for r in rungs)
    text = (report / "report.md").read_text()
    assert "## Comparison" in text and "d-phase1-5" in text and "95% interval" in text
    assert "The guide's ladder" in text and (report / "ladder.png").stat().st_size > 0
