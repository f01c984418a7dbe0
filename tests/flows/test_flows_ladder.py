"""The guide's ladder through the served deployments: phase1.5, then phase2a on the same data set;
the phase2a run compares with the phase1.5 run without being told to."""
from __future__ import annotations

import json

from lora.data.split import load_settings


def test_phase2a_compares_with_phase1_5_without_being_told(served, prefect_cli, booru, tmp_path):
    ws = tmp_path / "ws"
    # a data set that holds out a quarter of its images, so 12 images give 3 to pair on
    load_settings(ws / "datasets" / "d", 0.25)
    # the README's `-p group=JSON` shape; each deployment keeps its own training.preset
    data = {"workspace": str(ws), "dataset": "d", "tags": "1girl", "target_size": 12,
            "booru_url": booru.url, "requests_per_second": 10}
    common = ["-p", f"data={json.dumps(data)}", "-p", 'training={"model": "tiny", "max_steps": 2}',
              "-p", 'results={"sample": false}']
    for rung in ("phase1.5", "phase2a"):
        run = prefect_cli(["deployment", "run", f"train-lora/{rung}", "--watch", *common], served, timeout=420)
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
