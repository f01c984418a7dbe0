"""The `train-lora` flow: one DAG from a Danbooru query to a published LoRA.

grow the data set (`grow-dataset`, refreshing with `dataset-refresh` while below target) →
train in resumable segments (`train-in-segments`, one `train-segment` task each) → analyze →
samples → publish when asked and the gate passes.

Everything a killed run needs to continue lives on disk (data-set versions, checkpoints), so
running the deployment again with the same ``run_name`` (or `prefect flow-run retry`) picks
up where it stopped and never repeats a finished segment. What the run folder says about the
run (its step, whether it is complete) is read through :class:`lora.runpaths.RunPaths`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.dataset_refresh import dataset_refresh
from flows.params import DataSetParams, ResultsParams, TrainingParams, run_parameters
from lora.analysis.ladder import resolve_compare
from lora.config import TrainConfig, resolve_config
from lora.datapaths import DatasetPaths
from lora.data.versions import latest_version, read_version
from lora.inputs import check_pipeline_inputs
from lora.runpaths import RunPaths
from lora.train import plan_total_steps
from tasks.artifacts import ProgressReporter, artifact_key
from tasks.library_logs import forward_library_logs
from tasks.results import analyze_run, link_lora_files, publish_run, sample_run
from tasks.train import train_segment

#: How many refresh rounds a run may spend growing its data set before it trains anyway.
MAX_REFRESH_ROUNDS = 3


class TrainingInterrupted(RuntimeError):
    """A segment stopped on SIGINT/SIGTERM: its checkpoint is on disk, but no further segment
    starts (the process is being stopped, and another would just ignore the next signal)."""


def default_run_name(preset: str, dataset: str) -> str:
    """Deterministic, so re-running a deployment without a name resumes the same run."""
    return f"{dataset}-{preset}".replace(".", "-")


def run_name_of(data: DataSetParams, training: TrainingParams) -> str:
    """The run's folder name: ``training.run_name``, else :func:`default_run_name`."""
    return training.run_name or default_run_name(training.preset, data.dataset)


def _flow_run_name() -> str:
    """``<preset>-<run name>``, from the groups the run trains with (deployment defaults included)."""
    data, training, _ = run_parameters(dict(flow_run.parameters))
    return f"{training.preset}-{run_name_of(data, training)}"


def dataset_status(workspace: Path, dataset: str) -> tuple[str | None, int]:
    """The latest data-set version and how many images it holds."""
    paths = DatasetPaths.of(workspace, dataset)
    version = latest_version(paths)
    if version is None:
        return None, 0
    data = read_version(paths, version)
    return version, int(data.get("count", len(data.get("files", []))))


def training_progress(run_dir: Path) -> tuple[int, bool]:
    """Steps already done and whether the run is complete (its log says so and its LoRA files exist)."""
    run = RunPaths(run_dir)
    return run.global_step(), run.is_complete()


@flow(name="grow-dataset", flow_run_name="grow-dataset-{data.dataset}")
def grow_dataset(data: DataSetParams) -> tuple[str, int]:
    """Refresh the data set until it holds ``data.target_size`` images; return the version to train on.

    At most :data:`MAX_REFRESH_ROUNDS` refreshes, and none after one that added nothing (the
    query has run dry): a data set below target trains on what there is, with a warning. An
    empty data set is an error naming the query.
    """
    logger = get_run_logger()
    ws, dataset, target_size = Path(data.workspace), data.dataset, data.target_size
    version, size = dataset_status(ws, dataset)
    rounds = 0
    while size < target_size and rounds < MAX_REFRESH_ROUNDS:
        rounds += 1
        logger.info("data set %s holds %d images, target %d: refreshing", dataset, size, target_size)
        dataset_refresh(
            workspace=str(ws), dataset=dataset, tags=data.tags, target_size=target_size, limit=None,
            ratings=data.ratings, min_side=data.min_side, trigger_word=data.trigger_word,
            booru_url=data.booru_url, requests_per_second=data.requests_per_second,
            credentials_block=data.danbooru_credentials_block,
        )
        previous = size
        version, size = dataset_status(ws, dataset)
        if size <= previous:
            break
    if size == 0 or version is None:
        raise RuntimeError(f"data set {dataset!r} has no images; check tags {data.tags!r} and booru_url")
    if size < target_size:
        logger.warning("data set %s has %d of %d images; training on what there is", dataset, size, target_size)
    logger.info("training on data set %s version %s (%d images)", dataset, version, size)
    return version, size


@task(name="train-in-segments", cache_policy=NO_CACHE)
def train_segments(
    cfg: TrainConfig,
    run_dir: str,
    total: int,
    segment_steps: int | None,
    segment_minutes: float,
    gpus: int,
) -> int:
    """Train the run to ``total`` steps, one ``train-segment`` task per segment; return the step reached.

    Each segment resumes from the latest checkpoint on disk, so a run that is already
    complete trains nothing and a killed run continues with the segment it was in. Stops
    (raises) when a segment was interrupted (the worker is stopping) or two segments in a
    row made no progress.
    """
    logger = get_run_logger()
    run_name = cfg.run_name or Path(run_dir).name
    step, complete = training_progress(Path(run_dir))
    per_segment = segment_steps or total
    if complete:
        logger.info("run %s is already complete at step %d: no training segment to repeat", run_name, step)
        return step
    progress = ProgressReporter.create(
        artifact_key("training-progress", run_name), f"{run_name}: starting at step {step}/{total}"
    )
    stalled = 0
    while not complete:
        segment = step // per_segment + 1
        result = train_segment(
            cfg, run_dir, segment,
            stop_at_step=min(total, (segment) * per_segment),
            time_budget_s=segment_minutes * 60 if segment_minutes else None,
            progress_artifact_id=str(progress.artifact_id) if progress.artifact_id else None,
            gpus=gpus,
        )
        complete = bool(result["complete"])
        if result["stopped_reason"] == "interrupted":  # SIGINT/SIGTERM: the worker is stopping
            raise TrainingInterrupted(
                f"training of {run_name} was interrupted at step {result['global_step']}/{total} "
                "(checkpoint saved); run the flow again to continue"
            )
        stalled = 0 if result["global_step"] > step else stalled + 1
        if stalled >= 2:
            raise RuntimeError(
                f"training made no progress in two segments at step {step}; "
                "raise segment_minutes or check the run's log"
            )
        step = result["global_step"]
    progress.update(100.0, f"{run_name}: complete at step {step}/{total}", force=True)
    return step


def _secret(block_name: str | None, env_names: tuple[str, ...]) -> str | None:
    """A secret from a Prefect Secret block, else the environment; never logged."""
    if block_name:
        from prefect.blocks.system import Secret

        return Secret.load(block_name).get()
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _run_config(training: TrainingParams, run_name: str, dataset_dir: Path, version: str) -> TrainConfig:
    """The run's config: the preset, the flow's overrides, and the run's name, data set and version."""
    run_overrides: dict[str, Any] = dict(training.overrides or {})
    run_overrides.update(
        model=training.model, run_name=run_name, dataset=str(dataset_dir), dataset_version=version
    )
    if training.max_steps is not None:
        run_overrides["max_steps"] = training.max_steps
    if training.epochs is not None:
        run_overrides["epochs"] = training.epochs
    return resolve_config(training.preset, run_overrides, None)


@flow(name="train-lora", flow_run_name=_flow_run_name, log_prints=True)
def train_lora(
    data: DataSetParams = DataSetParams(),
    training: TrainingParams = TrainingParams(),
    results: ResultsParams = ResultsParams(),
) -> dict[str, Any]:
    """Fetch → train (segments) → analyze → samples → publish, resumable by ``training.run_name``.

    ``data.target_size`` is the number of images the data set must hold before training (Level 2
    grows 300 → 600); ``training.segment_minutes`` is each training segment's time budget (a
    Colab session's limit); ``training.max_steps`` caps training for demos and tests;
    ``results.compare_to`` names an earlier run in the same workspace to compare, sample against
    and gate publishing on ("auto", the default: the previous rung of the guide's ladder on the
    same data set, e.g. phase2a-l2 → phase2a, when it has a finished run; "none": no comparison).
    ``training.gpus`` > 1 trains each segment data-parallel on that many of the worker's GPUs
    (docs/gpu.md). A deployment's values for a group fill the fields a run leaves out
    (flows/params.py).

    Args:
        data: The data set to grow before training: its workspace and name, the Danbooru query
            and the number of images to reach.
        training: What to train (preset, base model, overrides) and how: run name, length,
            segments and GPUs.
        results: What happens to the trained LoRA: comparison, samples, publishing to the Hub.
    """
    forward_library_logs()
    logger = get_run_logger()
    data, training, results = run_parameters({"data": data, "training": training, "results": results})
    run_name = run_name_of(data, training)
    check_pipeline_inputs(workspace=data.workspace, dataset=data.dataset, run_name=run_name,
                          repo_id=results.repo_id)
    ws = Path(data.workspace).expanduser().resolve()
    dataset_dir = DatasetPaths.of(ws, data.dataset).root
    run = RunPaths.of(ws, run_name)
    run_dir = run.root

    # 1. Grow the data set to its target, then pin its version.
    version, size = grow_dataset(data.model_copy(update={"workspace": str(ws)}))

    # 2. Train in segments; each resumes from the latest checkpoint on disk.
    cfg = _run_config(training, run_name, dataset_dir, version)
    total = plan_total_steps(cfg, dataset_dir, run_dir)
    step = train_segments(cfg, str(run_dir), total, training.segment_steps,
                          training.segment_minutes, training.gpus)

    # 3. Analyze (against the compared run, if any), 4. samples, 5. publish.
    found = resolve_compare(ws, results.compare_to, training.preset, dataset_dir, run_dir)
    compare_dir = str(found) if found else None
    if compare_dir:
        logger.info("comparing with run %s", Path(compare_dir).name)
    analysis = analyze_run(str(run_dir), run_name, compare_dir, workspace=str(ws))
    lora_files = link_lora_files(str(run_dir), run_name)
    samples = sample_run(training.model, str(run_dir), run_name, compare_dir) if results.sample else None
    token = (_secret(results.hub_token_block, ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
             if results.publish else None)
    outcome = publish_run(
        str(run_dir), run_name, analysis["metrics"], analysis["baseline"], results.publish,
        results.repo_id, results.publish_dry_run, token=token, endpoint=results.hub_endpoint,
        private=results.private, allow_test_model=results.allow_test_model,
    )
    return {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "dataset_version": version,
        "dataset_size": size,
        "global_step": step,
        "lora_files": lora_files,
        "report": str(run.report_md),
        "samples_grid": samples["grid"] if samples else None,
        "verdict": analysis["metrics"].get("verdict"),
        "publish": outcome,
    }
