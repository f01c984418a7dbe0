"""The `sweep` flow: train candidate recipes rung by rung, prune the clearly worse, name the best.

The rule and the state are the library's (lora/sweep/): this flow only says how a rung's
trainings run. Each candidate's training for a rung is a `sweep-candidate` flow run (named
``<run name>-rung<N>``, visible in the UI under the sweep), whose `train-segment` tasks hold a
slot of the `gpu` limit while they train (tasks/gpu.py), exactly as `train-lora` does.

Two ways, one result:

- **In parallel, across workers** (a deployment run of the sweep, or ``parallel=True``): every
  candidate of a rung becomes a run of the ``sweep-candidate/train`` deployment, all submitted
  together and then awaited, so a work pool with several GPU workers (or several `animelora
  serve` hosts) trains them at once; the `gpu` limit still keeps each GPU to its slots. What a
  candidate reached is read back from its run folder (lora/sweep/runner.py outcome_from_run),
  not from Prefect results, so the workers need no shared result storage, only the workspace.
- **One after another, in the sweep's own process** (``parallel=False``, or the flow called
  directly without a deployment, as the tests and notebooks do): a child flow run per candidate.

After each rung the sweep's table and report (with the validation plot) are updated as
artifacts; at the end the winner is analyzed like any run (`analyze-run`, `list-lora-files`).

A killed sweep (worker lost, Ctrl-C, a session limit) continues when the deployment runs
again with the same ``name``: the state in ``<workspace>/sweeps/<name>/state.json`` says which
rungs are done and which candidates were pruned, and every run folder resumes from its
checkpoint. A candidate's deployment run that outlived the killed sweep (still scheduled or
training) is awaited again rather than started twice, so two trainings never share a run
folder; one that finished its rung meanwhile is recorded without training again.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.params import ResultsParams, deployment_parameters, with_deployment_defaults
from flows.train_lora import _secret
from lora.analysis.ladder import resolve_compare
from lora.config import DEFAULT_MODEL, TrainConfig
from lora.datapaths import DatasetPaths
from lora.inputs import check_pipeline_inputs
from lora.runpaths import RunPaths
from lora.sweep import (
    JobOutcome, RungDecision, SweepSpec, SweepState, TrainJob, TrainMany, build_spec, outcome_from_run,
    pin_dataset_version, render_report, report_rows, run_sweep,
)
from lora.train import plan_total_steps
from tasks.artifacts import artifact_key, inline_relative_images, path_text
from tasks.library_logs import forward_library_logs
from tasks.results import analyze_run, link_lora_files, publish_run, sample_run
from tasks.train import train_segment


@flow(name="sweep-candidate", flow_run_name="{run_name}-rung{rung}")
def sweep_candidate(config: TrainConfig, run_dir: str, run_name: str, rung: int,
                    stop_at_step: int | None, segment_minutes: float = 60.0, gpus: int = 1) -> dict[str, Any]:
    """Train one candidate to ``stop_at_step`` (None: to its end), one `train-segment` task per
    segment, each resuming from the run's latest checkpoint under the GPU limit. Started by the
    `sweep` flow (as its child, or as a run of the `sweep-candidate/train` deployment on a worker),
    not by hand. ``config`` arrives as JSON from a deployment run; Prefect validates it into the
    config object."""
    forward_library_logs()  # a deployment run is a flow run of its own: the trainer's lines to the UI
    target = stop_at_step or plan_total_steps(config, None, Path(run_dir))
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


def _candidate_parameters(job: TrainJob, segment_minutes: float, gpus: int) -> dict[str, Any]:
    """`sweep-candidate`'s parameters for one job: the config as the object (a deployment run
    sends it to its worker as JSON, and the flow validates it back)."""
    return {"config": job.config, "run_dir": str(job.run_dir),
            "run_name": job.config.run_name or job.run_dir.name, "rung": job.rung + 1,
            "stop_at_step": job.stop_at_step, "segment_minutes": segment_minutes, "gpus": gpus}


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def prefect_train_many(segment_minutes: float, gpus: int) -> TrainMany:
    """A rung's trainings one after another as `sweep-candidate` child flow runs in this process;
    a failed one is the candidate's failure (recorded, the sweep goes on), not the sweep's."""
    def run(jobs: list[TrainJob]) -> dict[str, JobOutcome]:
        out: dict[str, JobOutcome] = {}
        for job in jobs:
            started = time.monotonic()
            state = sweep_candidate(**_candidate_parameters(job, segment_minutes, gpus), return_state=True)
            if not state.is_completed():
                try:
                    state.result()
                    message = f"child flow run ended {state.name}"
                except BaseException as exc:  # noqa: BLE001 - the candidate's failure, in one line
                    message = _one_line(f"{type(exc).__name__}: {exc}")
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


#: The deployment a candidate's rung runs as when the sweep trains its candidates in parallel.
CANDIDATE_DEPLOYMENT = "sweep-candidate/train"
#: States of a candidate run that is still coming: a resumed sweep awaits it instead of a new one.
_IN_FLIGHT = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
#: Final states after which a candidate's run folder says what it reached; FAILED and CANCELLED
#: are the candidate's failure, CRASHED (its worker was lost) stops the sweep resumably.
_FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def _flow_run_name(job: TrainJob) -> str:
    return f"{job.config.run_name or job.run_dir.name}-rung{job.rung + 1}"


def _in_flight(deployment_id: UUID, jobs: list[TrainJob]) -> dict[str, FlowRun]:
    """Candidate runs of this deployment still scheduled or training for these jobs (same name
    and run folder): what a killed sweep left behind, to be awaited rather than started twice."""
    by_name = {_flow_run_name(j): j for j in jobs}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            name=FlowRunFilterName(any_=list(by_name)),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_IN_FLIGHT))))
    found: dict[str, FlowRun] = {}
    for run in runs:
        job = by_name.get(run.name)
        if job is not None and run.parameters.get("run_dir") == str(job.run_dir):
            found.setdefault(job.candidate, run)
    return found


def _wait_final(run_ids: dict[str, UUID], poll_s: float) -> dict[str, FlowRun]:
    """Poll until every run is in a final state (no timeout: a rung takes as long as it takes)."""
    logger = get_run_logger()
    done: dict[str, FlowRun] = {}
    by_id = {rid: cand for cand, rid in run_ids.items()}
    while len(done) < len(run_ids):
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[rid for cand, rid in run_ids.items() if cand not in done])))
        for run in runs:
            if run.state_type in _FINAL:
                done[by_id[run.id]] = run
                logger.info("candidate %s: %s %s", by_id[run.id], run.name, run.state_name)
        if len(done) < len(run_ids):
            time.sleep(poll_s)
    return done


def _outcome(job: TrainJob, run: FlowRun) -> JobOutcome:
    if run.state_type in (StateType.COMPLETED, StateType.CRASHED):
        return outcome_from_run(job)  # not at its target: interrupted, the sweep stops resumably
    message = (run.state.message if run.state else None) or f"flow run {run.name} ended {run.state_name}"
    return outcome_from_run(job, error=_one_line(message))


def deployment_train_many(deployment: str, deployment_id: UUID, segment_minutes: float, gpus: int,
                          poll_s: float = 2.0) -> TrainMany:
    """A rung's trainings as runs of the ``deployment`` (`sweep-candidate`), all submitted at once
    and then awaited: as many train at a time as there are workers and `gpu` slots."""
    def run(jobs: list[TrainJob]) -> dict[str, JobOutcome]:
        logger = get_run_logger()
        runs = _in_flight(deployment_id, jobs)
        for cand, found in runs.items():
            logger.info("candidate %s: awaiting %s (%s), started before the sweep was stopped",
                        cand, found.name, found.state_name)
        new = [job for job in jobs if job.candidate not in runs]
        for job in new:
            runs[job.candidate] = run_deployment(
                deployment, parameters=_candidate_parameters(job, segment_minutes, gpus),
                flow_run_name=_flow_run_name(job), timeout=0, tags=["sweep"])
        logger.info("rung %d: %d candidate run(s) of %s submitted, %d awaited again; waiting for them",
                    jobs[0].rung + 1, len(new), deployment, len(jobs) - len(new))
        finals = _wait_final({cand: r.id for cand, r in runs.items()}, poll_s)
        return {job.candidate: _outcome(job, finals[job.candidate]) for job in jobs}

    return run


def _deployment_id(name: str) -> UUID | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            return None


def choose_train_many(parallel: bool | None, candidate_deployment: str, segment_minutes: float,
                      gpus: int) -> TrainMany:
    """In parallel on ``candidate_deployment`` when asked (``parallel=True``) or, by default, when
    the sweep itself runs from a deployment (so workers are there to take the candidates);
    otherwise one after another in this process. Asked for and not deployed: a clear error."""
    logger = get_run_logger()
    ctx = FlowRunContext.get()
    from_deployment = bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)
    if parallel is False or (parallel is None and not from_deployment):
        logger.info("candidates train one after another in this flow run (parallel=%s%s)", parallel,
                    "" if parallel is False else ", not a deployment run")
        return prefect_train_many(segment_minutes, gpus)
    flow_name, _, deployment_name = candidate_deployment.partition("/")
    if not flow_name or not deployment_name:
        raise ValueError(f"candidate_deployment: expected <flow>/<deployment> such as {CANDIDATE_DEPLOYMENT!r}, "
                         f"got {candidate_deployment!r}")
    found = _deployment_id(candidate_deployment)
    if found is None:
        if parallel:
            raise ValueError(f"candidate_deployment {candidate_deployment!r} is not deployed: serve it "
                             "(animelora serve) or deploy prefect.yaml, or pass parallel=false")
        logger.warning("deployment %s not found: candidates train one after another in this flow run",
                       candidate_deployment)
        return prefect_train_many(segment_minutes, gpus)
    logger.info("candidates train in parallel as runs of %s", candidate_deployment)
    return deployment_train_many(candidate_deployment, found, segment_minutes, gpus)


def _publish_table(state: SweepState) -> None:
    """The sweep's table (candidate x rung, paired difference vs the best) as an artifact."""
    create_table_artifact(key=artifact_key("sweep", state.spec.name), table=report_rows(state),
                          description=f"Sweep {state.spec.name}: validation loss per rung, paired "
                                      "difference vs the rung's best (95% interval)")


def _publish_report(state: SweepState) -> None:
    """report.md as a markdown artifact, its validation plot embedded (the UI cannot open files)."""
    markdown = inline_relative_images(render_report(state), state.root)
    create_markdown_artifact(key=artifact_key("sweep-report", state.spec.name),
                             markdown=markdown + f"\n\nSweep folder: {path_text(state.root)}\n",
                             description=f"Sweep {state.spec.name}: report (also {state.report_path})")


def _on_rung(decision: RungDecision, state: SweepState) -> None:
    logger = get_run_logger()
    logger.info("rung %d: best %s; pruned %s", decision.rung + 1, decision.best,
                ", ".join(decision.pruned) or "none")
    _publish_table(state)
    _publish_report(state)


def sweep_spec(workspace: str, dataset: str, name: str, preset: str, model: str,
               base: dict[str, Any] | None, grid: dict[str, list[Any]] | None,
               candidates: list[dict[str, Any]] | None, rungs: list[int] | None) -> tuple[Path, SweepSpec]:
    """The workspace and the sweep's spec from the flow's parameters, the data set's latest
    version pinned (the same spec every time the flow resumes the sweep). Names and paths are
    checked before (lora.inputs.check_pipeline_inputs)."""
    ws = Path(workspace).expanduser().resolve()
    dataset_dir = DatasetPaths.of(ws, dataset).root
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"data set {dataset!r} not found in {dataset_dir.parent}; run "
                                "dataset-refresh or train-lora first")
    shared = pin_dataset_version({**(base or {}), "model": model, "dataset": str(dataset_dir)})
    return ws, build_spec(name, preset=preset, base=shared, grid=grid, candidates=candidates, rungs=rungs)


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
    parallel: bool | None = None,
    candidate_deployment: str = CANDIDATE_DEPLOYMENT,
    results: ResultsParams | None = None,
) -> dict[str, Any]:
    """Train ``grid`` (every combination) and ``candidates`` (a list of settings) on the data
    set's latest version, compare them at ``rungs`` (epochs; default a quarter and half of the
    longest run, then the end), stop the clearly worse, and name the best with its interval.

    ``base`` holds settings every candidate shares (epochs, batch_size, max_steps, ...);
    ``stop_after_rungs`` stops after that many rungs (run again to continue). ``parallel``: the
    candidates of a rung train at once as runs of ``candidate_deployment`` (on whichever workers
    serve it), or one after another in this flow run (false); by default in parallel when the
    sweep runs from a deployment. The winner goes the way of any `train-lora` run, with the same
    ``results`` group (flows/params.py): analyzed against ``results.compare_to`` ("auto": the
    newest finished run of the guide's previous rung on this data set), sampled, and published
    only when asked and when the gate passes (its paired interval against that run, or its base
    model, below 0).
    """
    forward_library_logs()
    logger = get_run_logger()
    results = with_deployment_defaults("results", results, ResultsParams, deployment_parameters())
    check_pipeline_inputs(workspace=workspace, dataset=dataset, run_name=name, repo_id=results.repo_id)
    ws, spec = sweep_spec(workspace, dataset, name, preset, model, base, grid, candidates, rungs)
    dataset_dir = DatasetPaths.of(ws, dataset).root
    logger.info("sweep %s: %d candidates, rungs at epochs %s then the end", name, len(spec.candidates),
                list(spec.rungs) or "-")
    train_many = choose_train_many(parallel, candidate_deployment, segment_minutes, gpus)
    result = run_sweep(spec, ws, train_many=train_many, stop_after_rungs=stop_after_rungs, on_rung=_on_rung)
    _publish_table(result.state)
    _publish_report(result.state)
    out = result.to_dict()
    if result.status == "complete" and result.best:
        best_dir = out["best_run_dir"]
        run_name = spec.run_name(spec.candidate(result.best))
        found = resolve_compare(ws, results.compare_to, preset, dataset_dir, best_dir)
        compare_dir = str(found) if found else None
        analysis = analyze_run(best_dir, run_name, compare_dir, workspace=str(ws))
        out["lora_files"] = link_lora_files(best_dir, run_name)
        out["verdict"] = analysis["metrics"].get("verdict")
        samples = sample_run(model, best_dir, run_name, compare_dir) if results.sample else None
        out["samples_grid"] = samples["grid"] if samples else None
        token = (_secret(results.hub_token_block, ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
                 if results.publish else None)
        out["publish"] = publish_run(
            best_dir, run_name, analysis["metrics"], analysis["baseline"], results.publish, results.repo_id,
            results.publish_dry_run, token=token, endpoint=results.hub_endpoint, private=results.private,
            allow_test_model=results.allow_test_model,
        )
    return out
