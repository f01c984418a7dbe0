"""Serve the deployments and start a train-lora run as a user would, through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXPECTED = {
    "train-lora/phase1.5", "train-lora/phase2a", "train-lora/phase2a-l2",
    "train-lora/phase2b", "dataset-refresh/nightly",
}


def test_serve_lists_deployments_and_runs_phase2a_l2(served, prefect_cli, booru, tmp_path):
    """The README's `--params` shape: groups passed as JSON keep the deployment's other fields
    (phase2a-l2's preset, though the run passes a `training` group), and the run is named as
    before the parameters were grouped."""
    env = served
    listed = prefect_cli(["deployment", "ls"], env).stdout
    for name in EXPECTED:
        flow, deployment = name.split("/")
        assert flow in listed and deployment in listed, listed

    nightly = prefect_cli(["deployment", "inspect", "dataset-refresh/nightly"], env).stdout
    assert "0 3 * * *" in nightly, nightly
    assert "'timezone': 'UTC'" in nightly, nightly  # a setting (ANIMELORA_TIMEZONE), UTC by default

    ws = tmp_path / "ws"
    params = {
        "data": {"workspace": str(ws), "dataset": "d", "tags": "1girl", "target_size": 12,
                 "booru_url": booru.url, "requests_per_second": 10},
        "training": {"model": "tiny", "max_steps": 4},
        "results": {"sample": False},
    }
    run = prefect_cli(["deployment", "run", "train-lora/phase2a-l2", "--watch", "--params", json.dumps(params)],
                      env, timeout=420)
    assert run.returncode == 0, run.stdout + run.stderr
    run_dir = ws / "runs" / "d-phase2a-l2"
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((run_dir / "config.json").read_text())["config"]["preset"] == "phase2a-l2"
    with get_client(sync_client=True) as client:
        names = {r.name for r in client.read_flow_runs()}
    assert "phase2a-l2-d-phase2a-l2" in names, names


def test_serve_without_api_url_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    out = subprocess.run([str(BIN / "animelora"), "serve"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "PREFECT_API_URL" in out.stderr
