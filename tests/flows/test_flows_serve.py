"""Serve the deployments and start train-lora/phase2a as a user would, through the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXPECTED = {
    "train-lora/phase1.5", "train-lora/phase2a", "train-lora/phase2a-l2",
    "train-lora/phase2b", "dataset-refresh/nightly",
}


def test_serve_lists_deployments_and_runs_phase2a(served, prefect_cli, booru, tmp_path):
    env = served
    listed = prefect_cli(["deployment", "ls"], env).stdout
    for name in EXPECTED:
        flow, deployment = name.split("/")
        assert flow in listed and deployment in listed, listed

    nightly = prefect_cli(["deployment", "inspect", "dataset-refresh/nightly"], env).stdout
    assert "0 3 * * *" in nightly, nightly
    assert "'timezone': 'UTC'" in nightly, nightly  # a setting (ANIMELORA_TIMEZONE), UTC by default

    ws = tmp_path / "ws"
    run = prefect_cli(
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
