"""The `train-lora` flow: one DAG from a Danbooru query to a published LoRA.

ensure the data set (grow it with `dataset-refresh` when below target) → pin its version →
train in resumable segments → analyze → samples → publish when asked and the gate passes.

Everything a killed run needs to continue lives on disk (data-set versions, checkpoints), so
running the deployment again with the same ``run_name`` (or `prefect flow-run retry`) picks
up where it stopped and never repeats a finished segment.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dataset_refresh import dataset_refresh
from lora.analysis.ladder import resolve_compare
from lora.config import resolve_config
from lora.data.manifest import DatasetPaths
from lora.data.versions import latest_version, read_version
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


def _flow_run_name() -> str:
    params = flow_run.parameters
    preset = params.get("preset", "phase2a")
    name = params.get("run_name") or default_run_name(preset, params.get("dataset", "anime"))
    return f"{preset}-{name}"


def dataset_status(workspace: Path, dataset: str) -> tuple[str | None, int]:
    """The latest data-set version and how many images it holds."""
    paths = DatasetPaths.of(workspace, dataset)
    version = latest_version(paths)
    if version is None:
        return None, 0
    data = read_version(paths, version)
    return version, int(data.get("count", len(data.get("files", []))))


def training_progress(run_dir: Path) -> tuple[int, bool]:
    """Steps already done and whether the run is complete, from its training log."""
    log = run_dir / "training_log.json"
    if not log.exists():
        return 0, False
    try:
        data = json.loads(log.read_text())
    except (OSError, json.JSONDecodeError):
        return 0, False
    done = bool(data.get("complete")) and any((run_dir / "lora").glob("*.safetensors"))
    return int(data.get("global_step", 0)), done


def _secret(block_name: str | None, env_names: tuple[str, ...]) -> str | None:
    """A secret from a Prefect Secret block, else the environment; never logged."""
    if block_name:
        from prefect.blocks.system import Secret

        return Secret.load(block_name).get()
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


@flow(name="train-lora", flow_run_name=_flow_run_name, log_prints=True)
def train_lora(
    workspace: str = "workspace",
    dataset: str = "anime",
    tags: str = "1girl",
    target_size: int = 300,
    booru_url: str = "https://danbooru.donmai.us",
    ratings: str = "g,s",
    min_side: int = 512,
    trigger_word: str | None = None,
    danbooru_credentials_block: str | None = None,
    requests_per_second: float = 1.0,
    preset: str = "phase2a",
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    run_name: str | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    segment_steps: int | None = None,
    segment_minutes: float = 60.0,
    compare_to: str | None = "auto",
    sample: bool = True,
    publish: bool = False,
    publish_dry_run: bool = False,
    repo_id: str | None = None,
    private: bool = False,
    allow_test_model: bool = False,
    hub_token_block: str | None = None,
    hub_endpoint: str | None = None,
    gpus: int = 1,
) -> dict[str, Any]:
    """Fetch → train (segments) → analyze → samples → publish, resumable by ``run_name``.

    ``target_size`` is the number of images the data set must hold before training (Level 2
    grows 300 → 600); ``segment_minutes`` is each training segment's time budget (a Colab
    session's limit); ``max_steps`` caps training for demos and tests; ``compare_to`` names an
    earlier run in the same workspace to compare, sample against and gate publishing on
    ("auto", the default: the previous rung of the guide's ladder on the same data set, e.g.
    phase2a-l2 → phase2a, when it has a finished run; "none": no comparison).
    ``gpus`` > 1 trains each segment data-parallel on that many of the worker's GPUs
    (docs/gpu.md).
    """
    forward_library_logs()
    logger = get_run_logger()
    if gpus < 1:
        raise ValueError(f"gpus: expected 1 or more, got {gpus}")
    ws = Path(workspace).expanduser().resolve()
    dataset_dir = ws / "datasets" / dataset
    run_name = run_name or default_run_name(preset, dataset)
    run_dir = ws / "runs" / run_name

    # 1. Ensure the data set is big enough, then pin its version.
    version, size = dataset_status(ws, dataset)
    rounds = 0
    while size < target_size and rounds < MAX_REFRESH_ROUNDS:
        rounds += 1
        logger.info("data set %s holds %d images, target %d: refreshing", dataset, size, target_size)
        dataset_refresh(
            workspace=str(ws), dataset=dataset, tags=tags, target_size=target_size, limit=None,
            ratings=ratings, min_side=min_side, trigger_word=trigger_word, booru_url=booru_url,
            requests_per_second=requests_per_second,
            credentials_block=danbooru_credentials_block,
        )
        previous = size
        version, size = dataset_status(ws, dataset)
        if size <= previous:
            break
    if size == 0 or version is None:
        raise RuntimeError(f"data set {dataset!r} has no images; check tags {tags!r} and booru_url")
    if size < target_size:
        logger.warning("data set %s has %d of %d images; training on what there is", dataset, size, target_size)
    logger.info("training on data set %s version %s (%d images)", dataset, version, size)

    # 2. Train in segments; each resumes from the latest checkpoint on disk.
    run_overrides: dict[str, Any] = dict(overrides or {})
    run_overrides.update(
        model=model, run_name=run_name, dataset=str(dataset_dir), dataset_version=version
    )
    if max_steps is not None:
        run_overrides["max_steps"] = max_steps
    if epochs is not None:
        run_overrides["epochs"] = epochs
    cfg = resolve_config(preset, run_overrides, None)
    total = plan_total_steps(cfg, dataset_dir, run_dir)
    step, complete = training_progress(run_dir)
    per_segment = segment_steps or total
    if complete:
        logger.info("run %s is already complete at step %d: no training segment to repeat", run_name, step)
    else:
        progress = ProgressReporter.create(
            artifact_key("training-progress", run_name), f"{run_name}: starting at step {step}/{total}"
        )
        stalled = 0
        while not complete:
            segment = step // per_segment + 1
            result = train_segment(
                cfg.model_dump(mode="json"), str(run_dir), segment,
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

    # 3.–5. Analyze, sample, publish.
    found = resolve_compare(ws, compare_to, preset, dataset_dir, run_dir)
    compare_dir = str(found) if found else None
    if compare_dir:
        logger.info("comparing with run %s", Path(compare_dir).name)
    analysis = analyze_run(str(run_dir), run_name, compare_dir, workspace=str(ws))
    lora_files = link_lora_files(str(run_dir), run_name)
    samples = sample_run(model, str(run_dir), run_name, compare_dir) if sample else None
    token = _secret(hub_token_block, ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")) if publish else None
    outcome = publish_run(
        str(run_dir), run_name, analysis["metrics"], analysis["baseline"], publish, repo_id,
        publish_dry_run, token=token, endpoint=hub_endpoint, private=private,
        allow_test_model=allow_test_model,
    )
    return {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "dataset_version": version,
        "dataset_size": size,
        "global_step": step,
        "lora_files": lora_files,
        "report": str(run_dir / "report" / "report.md"),
        "samples_grid": samples["grid"] if samples else None,
        "verdict": analysis["metrics"].get("verdict"),
        "publish": outcome,
    }
