"""The `sweep` flow on a real temporary Prefect server: each candidate's rung is a child flow
run whose training holds the `gpu` limit, the sweep's table is an artifact, and the winner is
analyzed and sampled like any run, with the train-lora flow's `results` group."""
from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)

from flows.sweep import sweep


def test_sweep_flow_runs_candidates_as_child_flow_runs(prefect_api, workspace):
    state = sweep(workspace=str(workspace), dataset="demo", name="f", model="tiny",
                  base={"epochs": 2, "batch_size": 4, "checkpoint_every_minutes": 60},
                  grid={"learning_rate": [1e-9, 0.05]}, rungs=[1], return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["best"] == "lr0.05" and result["best_distinguishable"] is True
    assert [r["status"] for r in result["ranking"]] == ["complete", "pruned"]
    assert Path(result["report"]).is_file() and result["lora_files"]
    assert result["publish"]["published"] is False  # not asked: the gate path ran, nothing sent
    assert Path(result["samples_grid"]).is_file()  # results.sample (default on), as train-lora
    with get_client(sync_client=True) as client:
        parent = state.state_details.flow_run_id
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent])))
        child_tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
    # the pruned candidate trained one rung, the winner two
    assert sorted(r.name for r in children) == ["f-lr0.05-rung1", "f-lr0.05-rung2", "f-lr1e-09-rung1"]
    assert all(r.state.is_completed() for r in children)
    assert {r.name for r in child_tasks} >= {"train-segment-1"}
    by_key = {a.key: a for a in sorted(artifacts, key=lambda a: a.created)}  # the latest of each key
    assert by_key["sweep-f"].type == "table" and "lr1e-09" in str(by_key["sweep-f"].data)
    assert "**Best:** lr0.05" in by_key["sweep-report-f"].data
    # the report is shown after every rung, its validation plot drawn in place each time (the
    # UI cannot open the sweep folder's files)
    reports = [a for a in artifacts if a.key == "sweep-report-f"]
    assert len(reports) >= 2 and all("](data:image/png;base64," in a.data for a in reports)


def test_a_bad_results_field_is_refused_naming_it_before_training(prefect_api, workspace):
    state = sweep(workspace=str(workspace), dataset="demo", name="r", model="tiny",
                  grid={"learning_rate": [1e-9, 0.05]}, results={"publish": "maybe"}, return_state=True)
    assert state.is_failed() and "results" in state.message and "publish" in state.message, state.message
    assert not (workspace / "runs").exists() and not (workspace / "sweeps").exists()


@pytest.mark.parametrize("deployment, message", [
    ("sweep-candidate/not-deployed", "'sweep-candidate/not-deployed' is not deployed"),
    ("not-deployed", "expected <flow>/<deployment>"),
])
def test_parallel_sweep_without_the_candidate_deployment_is_refused_before_training(
        prefect_api, workspace, deployment, message):
    state = sweep(workspace=str(workspace), dataset="demo", name="p", model="tiny",
                  grid={"learning_rate": [1e-9, 0.05]}, parallel=True,
                  candidate_deployment=deployment, return_state=True)
    assert state.is_failed()
    assert message in state.message
    assert not (workspace / "runs").exists() and not (workspace / "sweeps").exists()
