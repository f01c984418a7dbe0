"""`make demo`'s entry point, end to end: its own Prefect server, loopback Danbooru, serve, run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_the_whole_dag_and_says_where_results_are(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run(
        [sys.executable, "-m", "deployments.demo", "--workspace", str(tmp_path / "ws"),
         "--max-steps", "6", "--target-size", "12", "--prefect-port", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Flow run finished successfully" in out.stdout + out.stderr
    runs = list((tmp_path / "ws" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (run / "samples" / "grid.png").exists()
    assert (run / "report" / "report.md").exists()
    assert (run / "hub" / "README.md").exists(), "the demo's dry-run publish stages the Hub folder"
    for label in ("LoRA files", "samples", "report", "Prefect UI"):
        assert label in out.stdout
