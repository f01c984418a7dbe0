"""RunPaths: the names of a run folder, the workspace it belongs to, and what its files say.

Fast: plain files in a temporary folder, nothing trained (and lora.runpaths imports no torch).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lora.runpaths import RunPaths

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_layout_matches_the_documented_run_folder(tmp_path):
    run = RunPaths.of(tmp_path / "ws", "my-run")
    root = (tmp_path / "ws").resolve() / "runs" / "my-run"
    assert run.root == root and run.name == "my-run"
    assert run.config == root / "config.json"
    assert run.log == root / "training_log.json"
    assert run.lock == root / ".lock"
    assert run.checkpoints == root / "checkpoints"
    assert run.lora == root / "lora"
    assert run.diffusers_weights == root / "lora" / "pytorch_lora_weights.safetensors"
    assert run.kohya_weights() == root / "lora" / "my-run.safetensors"
    assert run.kohya_weights("other") == root / "lora" / "other.safetensors"
    assert run.kept_lora(400) == root / "lora-step-400"
    assert run.samples == root / "samples"
    assert run.samples_grid == root / "samples" / "grid.png"
    assert run.samples_json == root / "samples" / "samples.json"
    assert run.report == root / "report"
    assert run.metrics == root / "report" / "metrics.json"
    assert run.report_md == root / "report" / "report.md"
    assert run.loss_plot == root / "report" / "loss_curve.png"
    assert run.hub == root / "hub" and run.hub_card == root / "hub" / "README.md"
    assert run.training_sample_set(30) == root / "training_samples" / "step-30"
    assert run.training_samples_grid == root / "training_samples" / "overview" / "grid.png"
    assert run.report_training_samples == root / "report" / "training_samples.png"
    assert run.tensorboard == root / "tensorboard"
    # the documented layout (docs/architecture.md) names these same files
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for path in (run.config, run.log, run.lock, run.diffusers_weights, run.metrics):
        assert path.name in doc, path.name


def test_the_workspace_is_the_folder_above_runs(tmp_path):
    assert RunPaths.of(tmp_path, "a").workspace == tmp_path.resolve()
    assert RunPaths(tmp_path / "runs" / "b").workspace == tmp_path
    assert RunPaths(tmp_path / "elsewhere" / "c").workspace is None  # not inside a workspace
    assert RunPaths.runs_root(tmp_path) == tmp_path.resolve() / "runs"


def _finish(run: RunPaths, *, complete: bool, step: int, files: bool) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.log.write_text(json.dumps({"global_step": step, "complete": complete, "steps": []}))
    if files:
        run.lora.mkdir(exist_ok=True)
        run.diffusers_weights.write_bytes(b"x")
        run.kohya_weights().write_bytes(b"x")


def test_status_of_a_new_a_started_and_a_finished_run(tmp_path):
    run = RunPaths.of(tmp_path, "r")
    assert run.read_log() is None and run.read_config() is None
    assert run.global_step() == 0 and run.finished_step() is None and not run.is_complete()
    assert run.lora_files() == [] and run.exported_lora_files() == []

    _finish(run, complete=False, step=4, files=False)
    assert run.global_step() == 4 and run.finished_step() is None and not run.is_complete()

    _finish(run, complete=True, step=8, files=False)  # the log says done, the files are gone
    assert run.finished_step() == 8 and not run.is_complete()

    _finish(run, complete=True, step=8, files=True)
    assert run.is_complete()
    assert run.lora_files() == sorted([run.diffusers_weights, run.kohya_weights()])
    assert run.exported_lora_files() == [run.diffusers_weights, run.kohya_weights()]
    assert run.exported_lora_files("renamed") == []  # the kohya file is named after the run


def test_training_sample_steps_are_the_sets_on_disk(tmp_path):
    """Read from the set folders, in step order: the training log on disk lags behind them."""
    run = RunPaths(tmp_path / "run")
    assert run.training_sample_steps() == []
    for step in (10, 0, 200):
        run.training_sample_set(step).mkdir(parents=True)
        (run.training_sample_set(step) / "samples.json").write_text("{}")
    run.training_sample_set(300).mkdir()  # being built: no samples.json yet
    (run.training_samples / "step-x").mkdir()
    assert run.training_sample_steps() == [0, 10, 200]


def test_unreadable_files_read_as_absent(tmp_path):
    run = RunPaths.of(tmp_path, "broken")
    run.root.mkdir(parents=True)
    run.log.write_text("{not json")
    run.config.write_text("[1, 2]")  # JSON, but not an object
    assert run.read_log() is None and run.read_config() is None
    assert run.global_step() == 0 and not run.is_complete()
    run.log.write_text(json.dumps({"global_step": True, "complete": True}))  # a bool is no step
    assert run.global_step() == 0 and run.finished_step() is None


def test_importing_runpaths_loads_neither_torch_nor_prefect():
    code = ("import sys, lora.runpaths; "
            "print(sorted(m for m in ('torch', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "[]"
