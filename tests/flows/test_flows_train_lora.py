"""The train-lora DAG on a real temporary Prefect server with the tiny model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.train_lora import train_lora
from lora.testing.fakehub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[2]


def _flow_run(state):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def _artifacts(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_full_phase2a_dag(prefect_api, flow_params, workspace):
    state = train_lora(
        **flow_params(training={"run_name": "full"},
                      results={"sample": True, "publish_dry_run": True, "repo_id": "someone/anime-lora"}),
        return_state=True,
    )
    assert state.is_completed(), state
    result = state.result()
    run_dir = Path(result["run_dir"])
    assert result["dataset_size"] >= 12
    assert (workspace / "datasets" / "demo" / "versions" / f"{result['dataset_version']}.json").exists()
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "lora" / "full.safetensors").exists()
    assert (run_dir / "report" / "report.md").exists()
    assert Path(result["samples_grid"]).exists()
    assert (run_dir / "hub" / "README.md").exists()
    assert result["publish"]["published"] is False and result["publish"]["dry_run"] is True
    log = json.loads((run_dir / "training_log.json").read_text())
    assert log["global_step"] == 8 and log["complete"] is True

    run = _flow_run(state)
    assert run.name == "phase2a-full"
    keys = {a.key for a in _artifacts(run.id)}
    for key in ("training-progress-full", "training-samples-full", "epoch-losses-full", "training-report-full",
                "samples-grid-full", "model-card-full", "publish-full"):
        assert key in keys, (key, keys)
    assert any(k.startswith("lora-") for k in keys)
    # what a person opens from the UI: images drawn in place, paths as text, no file:// links
    by_key = {a.key: a for a in _artifacts(run.id)}
    assert all("file://" not in str(a.data) for a in by_key.values())
    grid = by_key["samples-grid-full"]
    assert grid.type == "markdown" and "](data:image/png;base64," in grid.data
    assert str(Path(result["samples_grid"]).resolve()) in grid.data
    report = by_key["training-report-full"].data
    assert "](loss_curve.png)" not in report and "![loss curve](data:image/png;base64," in report
    # the samples drawn while training: one growing grid, in its own artifact and in the report
    assert "![samples while training](data:image/png;base64," in report
    # one artifact, updated in place after every set (one card in the run's Artifacts tab): it
    # shows every set
    (training_samples,) = [a for a in _artifacts(run.id) if a.key == "training-samples-full"]
    assert training_samples.type == "markdown"
    assert "![samples while training](data:image/png;base64," in training_samples.data
    assert "steps 0, " in training_samples.data and f", {log['global_step']}; rows" in training_samples.data
    files = by_key["lora-files-full"]
    assert files.type == "table" and str((run_dir / "lora" / "full.safetensors").resolve()) in str(files.data)
    assert by_key["model-card-full"].type == "markdown"


def test_segment_failure_is_retried_and_resumes(prefect_api, flow_params, workspace, monkeypatch):
    marker = workspace / "fault-once"
    monkeypatch.setenv("ANIMELORA_FAULT_ONCE", str(marker))
    state = train_lora(**flow_params(training={"run_name": "retry", "segment_steps": 4}),
                       return_state=True)
    assert state.is_completed(), state
    assert marker.exists(), "the injected fault never fired"
    runs = [t for t in _task_runs(_flow_run(state).id) if t.name.startswith("train-segment")]
    assert sorted(t.name for t in runs) == ["train-segment-1", "train-segment-2"]
    retried = [t for t in runs if t.run_count > 1]
    assert len(retried) == 1, [(t.name, t.run_count) for t in runs]
    assert state.result()["global_step"] == 8


def test_segments_on_two_processes(prefect_api, flow_params, workspace):
    """gpus=2: each segment is a torchrun process group (gloo on CPU, NCCL on GPUs)."""
    state = train_lora(**flow_params(training={"run_name": "two-gpus", "segment_steps": 4, "gpus": 2}),
                       return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["global_step"] == 8
    run_dir = Path(result["run_dir"])
    log = json.loads((run_dir / "training_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, 9)) and log["complete"] is True
    assert (run_dir / "lora" / "two-gpus.safetensors").exists()
    assert not list(run_dir.glob(".segment-*"))  # the launch's temporary files are gone
    runs = [t for t in _task_runs(_flow_run(state).id) if t.name.startswith("train-segment")]
    assert sorted(t.name for t in runs) == ["train-segment-1", "train-segment-2"]


def test_config_error_fails_without_retry_loop(prefect_api, flow_params, workspace):
    state = train_lora(**flow_params(training={"run_name": "bad", "overrides": {"learning_rate": -1.0}}),
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="learning_rate"):
        state.result()


def test_killed_run_continues_without_repeating_segments(prefect_api, flow_params, workspace):
    params = flow_params(training={"run_name": "killed", "max_steps": 12, "segment_steps": 4})
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO_ROOT)}
    code = ("import json, sys; from flows.train_lora import train_lora; "
            "train_lora(**json.loads(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], env=env,
                            cwd=REPO_ROOT, start_new_session=True)
    checkpoints = workspace / "runs" / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [p for p in checkpoints.glob("step-*") if (p / "checkpoint.json").exists()]
            if any(int(p.name.split("-")[1]) >= 4 for p in done):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _free_orphaned_gpu_slot()

    state = train_lora(**params, return_state=True)
    assert state.is_completed(), state
    assert state.result()["global_step"] == 12
    names = sorted(t.name for t in _task_runs(_flow_run(state).id)
                   if t.name.startswith("train-segment"))
    assert "train-segment-1" not in names, names
    log = json.loads((workspace / "runs" / "killed" / "training_log.json").read_text())
    steps = [s["step"] for s in log["steps"]]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def _free_orphaned_gpu_slot() -> None:
    """The killed run held a slot of the `gpu` limit (every segment makes sure the limit exists
    and acquires it strictly). A real server's lease repossessor frees it once the 300 s lease
    runs out; the test server runs no services, so do what the repossessor would."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    from tasks.train import GPU_LIMIT

    with get_client(sync_client=True) as client:
        try:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0))
        except ObjectNotFound:
            pass  # no limit on this server: nothing was held


def _write_baseline(workspace: Path, name: str, val_loss: float) -> None:
    """A finished earlier run (the guide's log schema plus validation) to compare against."""
    run = workspace / "runs" / name
    run.mkdir(parents=True)
    log = {
        "epochs": 2, "batch_size": 4, "learning_rate": 5e-5, "lora_rank": 16, "lora_alpha": 64,
        "losses": [{"epoch": 1, "loss": 0.2, "time_seconds": 1.0},
                   {"epoch": 2, "loss": 0.19, "time_seconds": 2.0}],
        "validation": [{"step": 4, "epoch": 1, "loss": val_loss, "per_timestep": {"500": val_loss}},
                       {"step": 8, "epoch": 2, "loss": val_loss, "per_timestep": {"500": val_loss}}],
        "complete": True, "global_step": 8,
    }
    (run / "training_log.json").write_text(json.dumps(log))


def test_publish_gate_both_ways(prefect_api, flow_params, workspace, monkeypatch):
    token = "hf_test_secret_token_123456"
    monkeypatch.setenv("HF_TOKEN", token)
    _write_baseline(workspace, "much-worse", 1e6)
    _write_baseline(workspace, "much-better", 1e-9)
    with FakeHub() as hub:
        results = {"publish": True, "allow_test_model": True, "repo_id": "me/gated-lora",
                   "hub_endpoint": hub.url}

        def gated(compare_to: str):
            return train_lora(**flow_params(training={"run_name": "gated"},
                                            results={**results, "compare_to": compare_to}), return_state=True)

        passed = gated("much-worse")
        assert passed.is_completed(), passed
        outcome = passed.result()["publish"]
        assert outcome["published"] is True, outcome
        sent = set(hub.files.get("me/gated-lora", {}))
        assert "README.md" in sent and "pytorch_lora_weights.safetensors" in {Path(p).name for p in sent}

        blocked = gated("much-better")
        outcome = blocked.result()["publish"]
        assert outcome["published"] is False
        assert "gate failed" in outcome["reason"] and "validation loss" in outcome["reason"]
    for path in (workspace / "runs" / "gated").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
