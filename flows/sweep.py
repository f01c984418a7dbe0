"""The `sweep` flow: train candidate recipes rung by rung, prune the clearly worse, name the best.

The rule and the state are the library's (lora/sweep/): this flow only says how a rung's
trainings run. Each candidate's training for a rung is a `sweep-candidate` child flow run
(named ``<run name>-rung<N>``, visible in the UI under the sweep), whose `train-segment` tasks
hold a slot of the `gpu` limit while they train (tasks/gpu.py), exactly as `train-lora` does.
After each rung the sweep's table is updated as an artifact; at the end the winner is analyzed
like any run (`analyze-run`, `list-lora-files`) and the report is shown in the UI.

A killed sweep (worker lost, Ctrl-C, a session limit) continues when the deployment runs
again with the same ``name``: the state in ``<workspace>/sweeps/<name>/state.json`` says which
rungs are done and which candidates were pruned, and every run folder resumes from its
checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.train_lora import _secret
from lora.analysis.ladder import resolve_compare
from lora.config import DEFAULT_MODEL, TrainConfig
from lora.inputs import check_pipeline_inputs
from lora.runpaths import RunPaths
from lora.sweep import (
    JobOutcome, RungDecision, SweepState, TrainJob, TrainMany, build_spec, pin_dataset_version,
    render_report, report_rows, run_sweep,
)
from lora.train import plan_total_steps
from tasks.artifacts import artifact_key
from tasks.library_logs import forward_library_logs
from tasks.results import analyze_run, link_lora_files, publish_run
from tasks.train import train_segment


@flow(name="sweep-candidate", flow_run_name="{run_name}-rung{rung}")
def sweep_candidate(config: dict[str, Any], run_dir: str, run_name: str, rung: int,
                    stop_at_step: int | None, segment_minutes: float = 60.0, gpus: int = 1) -> dict[str, Any]:
    """Train one candidate to ``stop_at_step`` (None: to its end), one `train-segment` task per
    segment, each resuming from the run's latest checkpoint under the GPU limit."""
    cfg = TrainConfig(**config)
    target = stop_at_step or plan_total_steps(cfg, None, Path(run_dir))
    started = time.monotonic()
    segment, stalled = RunPaths(run_dir).global_step() // max(1, target) + 1, 0
    while True:
        before = RunPaths(run_dir).global_step()
        result = train_segment(config, run_dir, segment, stop_at_step=target,
                               time_budget_s=segment_minutes * 60 if segment_minutes else None, gpus=gpus)
        if result["complete"] or result["global_step"] >= target or result["stopped_reason"] == "interrupted":
            break
        stalled = 0 if result["global_step"] > before else stalled + 1
        if stalled >= 2:
            raise RuntimeError(f"{run_name}: no progress in two segments at step {before}; "
                               "raise segment_minutes or check the run's log")
        segment += 1
    return {**result, "train_s": time.monotonic() - started}


def prefect_train_many(segment_minutes: float, gpus: int) -> TrainMany:
    """A rung's trainings as `sweep-candidate` child flow runs; a failed one is the candidate's
    failure (recorded, the sweep goes on), not the sweep's."""
    def run(jobs: list[TrainJob]) -> dict[str, JobOutcome]:
        out: dict[str, JobOutcome] = {}
        for job in jobs:
            started = time.monotonic()
            state = sweep_candidate(
                config=job.config.model_dump(mode="json"), run_dir=str(job.run_dir),
                run_name=job.config.run_name or job.run_dir.name, rung=job.rung + 1,
                stop_at_step=job.stop_at_step, segment_minutes=segment_minutes, gpus=gpus,
                return_state=True,
            )
            if not state.is_completed():
                try:
                    state.result()
                    message = f"child flow run ended {state.name}"
                except BaseException as exc:  # noqa: BLE001 - the candidate's failure, in one line
                    message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                out[job.candidate] = JobOutcome(RunPaths(job.run_dir).global_step(), 0, False, "failed",
                                                time.monotonic() - started, message)
                continue
            result = state.result()
            out[job.candidate] = JobOutcome(result["global_step"], result["total_steps"], result["complete"],
                                            result["stopped_reason"], result["train_s"])
            if result["stopped_reason"] == "interrupted":
                break
        return out

    return run


def _publish_table(state: SweepState) -> None:
    """The sweep's table (candidate x rung, paired difference vs the best) as an artifact."""
    create_table_artifact(key=artifact_key("sweep", state.spec.name), table=report_rows(state),
                          description=f"Sweep {state.spec.name}: validation loss per rung, paired "
                                      "difference vs the rung's best (95% interval)")


def _on_rung(decision: RungDecision, state: SweepState) -> None:
    logger = get_run_logger()
    logger.info("rung %d: best %s; pruned %s", decision.rung + 1, decision.best,
                ", ".join(decision.pruned) or "none")
    _publish_table(state)


@flow(name="sweep", flow_run_name="sweep-{name}", log_prints=True)
def sweep(
    workspace: str = "workspace",
    dataset: str = "anime",
    name: str = "phase2a-sweep",
    preset: str = "phase2a",
    model: str = DEFAULT_MODEL,
    base: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    candidates: list[dict[str, Any]] | None = None,
    rungs: list[int] | None = None,
    stop_after_rungs: int | None = None,
    segment_minutes: float = 60.0,
    gpus: int = 1,
    compare_to: str | None = "auto",
    publish: bool = False,
    publish_dry_run: bool = False,
    repo_id: str | None = None,
    private: bool = False,
    allow_test_model: bool = False,
    hub_token_block: str | None = None,
    hub_endpoint: str | None = None,
) -> dict[str, Any]:
    """Train ``grid`` (every combination) and ``candidates`` (a list of settings) on the data
    set's latest version, compare them at ``rungs`` (epochs; default a quarter and half of the
    longest run, then the end), stop the clearly worse, and name the best with its interval.

    ``base`` holds settings every candidate shares (epochs, batch_size, max_steps, ...);
    ``stop_after_rungs`` stops after that many rungs (run again to continue). The winner goes
    the way of any `train-lora` run: analyzed against ``compare_to`` ("auto": the newest finished
    run of the guide's previous rung on this data set), and published only when asked and when
    the gate passes (its paired interval against that run, or its base model, below 0).
    """
    forward_library_logs()
    logger = get_run_logger()
    check_pipeline_inputs(workspace=workspace, dataset=dataset, run_name=name, repo_id=repo_id)
    ws = Path(workspace).expanduser().resolve()
    dataset_dir = ws / "datasets" / dataset
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"data set {dataset!r} not found in {ws / 'datasets'}; run "
                                "dataset-refresh or train-lora first")
    shared = pin_dataset_version({**(base or {}), "model": model, "dataset": str(dataset_dir)})
    spec = build_spec(name, preset=preset, base=shared, grid=grid, candidates=candidates, rungs=rungs)
    logger.info("sweep %s: %d candidates, rungs at epochs %s then the end", name, len(spec.candidates),
                list(spec.rungs) or "-")
    result = run_sweep(spec, ws, train_many=prefect_train_many(segment_minutes, gpus),
                       stop_after_rungs=stop_after_rungs, on_rung=_on_rung)
    _publish_table(result.state)
    create_markdown_artifact(key=artifact_key("sweep-report", name), markdown=render_report(result.state),
                             description=f"Sweep {name}: report (also {result.state.report_path})")
    out = result.to_dict()
    if result.status == "complete" and result.best:
        best_dir = out["best_run_dir"]
        run_name = spec.run_name(spec.candidate(result.best))
        found = resolve_compare(ws, compare_to, preset, dataset_dir, best_dir)
        compare_dir = str(found) if found else None
        analysis = analyze_run(best_dir, run_name, compare_dir, workspace=str(ws))
        out["lora_files"] = link_lora_files(best_dir, run_name)
        out["verdict"] = analysis["metrics"].get("verdict")
        token = _secret(hub_token_block, ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")) if publish else None
        out["publish"] = publish_run(
            best_dir, run_name, analysis["metrics"], analysis["baseline"], publish, repo_id,
            publish_dry_run, token=token, endpoint=hub_endpoint, private=private,
            allow_test_model=allow_test_model,
        )
    return out
