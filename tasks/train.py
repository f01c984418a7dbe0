"""Prefect tasks around the training engine: one task run per training segment.

Resumption lives in the run folder's checkpoints, not in Prefect state: a segment task (or a
retry of it, or a whole new flow run after a crash) always continues from the latest valid
checkpoint, so a retry never repeats finished steps.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydantic
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from lora.config import TrainConfig
from lora.train import train
from lora.train.launch import SegmentOutcome, run_segment_processes
from tasks.artifacts import ProgressReporter
from tasks.retry import retry_unless

#: Name of the global concurrency limit that keeps two trainings off one GPU.
GPU_LIMIT = "gpu"

#: Test and chaos hook: when this env var names a file that does not exist yet, the next
#: segment creates it and fails once, as a transient fault would (I/O error, lost device).
FAULT_ONCE_ENV = "ANIMELORA_FAULT_ONCE"


class InjectedFault(RuntimeError):
    """A deliberate one-off failure (see FAULT_ONCE_ENV)."""


#: Retry failures that a resume can fix; a bad config fails the same way every time.
_is_transient = retry_unless(pydantic.ValidationError, ValueError, FileNotFoundError, TypeError)


def _maybe_inject_fault() -> None:
    marker = os.environ.get(FAULT_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text("fault injected\n")
        raise InjectedFault(f"injected one-off failure ({FAULT_ONCE_ENV}={marker})")


@task(
    name="train-segment",
    task_run_name="train-segment-{segment}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_is_transient,
    cache_policy=NO_CACHE,
)
def train_segment(
    config: dict[str, Any],
    run_dir: str,
    segment: int,
    stop_at_step: int,
    time_budget_s: float | None = None,
    progress_artifact_id: str | None = None,
    gpus: int = 1,
) -> dict[str, Any]:
    """Resume the run from its latest checkpoint and train until ``stop_at_step`` or the budget.

    ``gpus`` > 1 trains the segment data-parallel in that many processes, one per visible GPU
    (lora/train/launch.py); the run holds one slot of the ``gpu`` limit either way, since the
    limit counts trainings on this worker's GPUs. Those segments report progress when they end.
    """
    logger = get_run_logger()
    cfg = TrainConfig(**config)
    with concurrency(GPU_LIMIT, occupy=1):
        _maybe_inject_fault()
        if gpus > 1:
            logger.info("segment %d: training in %d processes (torchrun)", segment, gpus)
            # a ConfigError (a ValueError) is not retried; SegmentLaunchError is, resuming from the checkpoint
            outcome = run_segment_processes(cfg, Path(run_dir), gpus, stop_at_step=stop_at_step,
                                            time_budget_s=time_budget_s)
        else:
            outcome = SegmentOutcome.from_result(train(
                cfg,
                Path(run_dir),
                stop_at_step=stop_at_step,
                time_budget_s=time_budget_s,
                on_progress=ProgressReporter(progress_artifact_id).training_callback(cfg.run_name or "train")
                if progress_artifact_id
                else None,
            ))
    logger.info(
        "segment %d stopped at step %d/%d (%s)",
        segment, outcome.global_step, outcome.total_steps, outcome.stopped_reason,
    )
    return asdict(outcome)
