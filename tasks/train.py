"""Prefect tasks around the training engine: one task run per training segment.

Resumption lives in the run folder's checkpoints, not in Prefect state: a segment task (or a
retry of it, or a whole new flow run after a crash) always continues from the latest valid
checkpoint, so a retry never repeats finished steps.
"""
from __future__ import annotations

import os
import time
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
from tasks.artifacts import ProgressReporter, publish_training_samples
from tasks.gpu import GPU_LIMIT, ensure_gpu_limit
from tasks.retry import is_out_of_memory, retry_unless

__all__ = ["GPU_LIMIT", "FAULT_ONCE_ENV", "InjectedFault", "SegmentOutOfMemory", "train_segment"]

#: Test and chaos hook: when this env var names a file that does not exist yet, the next
#: segment creates it and fails once, as a transient fault would (I/O error, lost device).
FAULT_ONCE_ENV = "ANIMELORA_FAULT_ONCE"
#: With FAULT_ONCE_ENV: ``oom`` makes that one failure a CUDA out-of-memory error instead.
FAULT_KIND_ENV = "ANIMELORA_FAULT_KIND"


class InjectedFault(RuntimeError):
    """A deliberate one-off failure (see FAULT_ONCE_ENV)."""


class SegmentOutOfMemory(RuntimeError):
    """The GPU ran out of memory and the trainer's own fallback could not avoid it."""


#: Retry failures that a resume can fix; a bad config or a too-big batch fails the same way
#: every time, so a retry only delays the error (and occupies the GPU slot).
_is_transient = retry_unless(
    pydantic.ValidationError, ValueError, FileNotFoundError, TypeError, SegmentOutOfMemory,
    when=is_out_of_memory,
)


def _maybe_inject_fault() -> None:
    marker = os.environ.get(FAULT_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text("fault injected\n")
        if os.environ.get(FAULT_KIND_ENV, "").lower() == "oom":
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected: {FAULT_ONCE_ENV}={marker})"
            )
        raise InjectedFault(f"injected one-off failure ({FAULT_ONCE_ENV}={marker})")


def _out_of_memory_message(segment: int, cfg: TrainConfig, exc: BaseException) -> str:
    detail = " ".join(str(exc).split())[:300]
    return (
        f"segment {segment}: out of GPU memory, not retried (a retry fails the same way): "
        f"{detail}. Lower batch_size (now {cfg.batch_size}) or resolution (now "
        f"{cfg.resolution}), or pass training.overrides={{\"low_memory\": true}} or "
        f"{{\"mixed_precision\": \"bf16\"}}, then run the deployment again with the same "
        "run_name: it resumes from its last checkpoint."
    )


@task(
    name="train-segment",
    task_run_name="train-segment-{segment}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_is_transient,
    cache_policy=NO_CACHE,
)
def train_segment(
    cfg: TrainConfig,
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

    The slot is acquired strictly (tasks/gpu.py makes sure the limit exists first): without
    the limit Prefect would only warn and let two trainings share the GPU. A lost lease
    renewal (API briefly unreachable) is logged, not fatal: killing an hour of training over
    a network blip costs more than the rare overlap it could prevent.

    Out of GPU memory: the trainer already retries a step with half the micro-batch; what
    still fails raises :class:`SegmentOutOfMemory` at once, which is never retried.
    """
    logger = get_run_logger()
    limit, slots = ensure_gpu_limit()
    logger.info("segment %d: waiting for a slot of the %r limit (%d slot(s))", segment, limit, slots)
    asked = time.monotonic()
    with concurrency(limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        logger.info("segment %d: holding a %r slot after %.1f s of waiting; training", segment, limit,
                    time.monotonic() - asked)
        try:
            outcome = _train(cfg, run_dir, segment, stop_at_step, time_budget_s,
                             progress_artifact_id, gpus)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise SegmentOutOfMemory(_out_of_memory_message(segment, cfg, exc)) from None
            raise
        logger.info(
            "segment %d stopped at step %d/%d (%s); releasing the %r slot",
            segment, outcome.global_step, outcome.total_steps, outcome.stopped_reason, limit,
        )
    return asdict(outcome)


def _train(
    cfg: TrainConfig,
    run_dir: str,
    segment: int,
    stop_at_step: int,
    time_budget_s: float | None,
    progress_artifact_id: str | None,
    gpus: int,
) -> SegmentOutcome:
    """One segment in this process, or in ``gpus`` processes (torchrun)."""
    logger = get_run_logger()
    _maybe_inject_fault()
    run_name = cfg.run_name or Path(run_dir).name
    if gpus > 1:
        logger.info("segment %d: training in %d processes (torchrun)", segment, gpus)
        # a ConfigError (a ValueError) is not retried; SegmentLaunchError is, resuming from the checkpoint
        outcome = run_segment_processes(cfg, Path(run_dir), gpus, stop_at_step=stop_at_step,
                                        time_budget_s=time_budget_s)
        _show_training_samples(run_dir, run_name)  # the processes report nothing while they train
        return outcome
    on_progress = (
        ProgressReporter(progress_artifact_id).training_callback(cfg.run_name or "train")
        if progress_artifact_id
        else None
    )
    return SegmentOutcome.from_result(train(
        cfg, Path(run_dir), stop_at_step=stop_at_step, time_budget_s=time_budget_s,
        on_progress=on_progress, on_samples=lambda _set: _show_training_samples(run_dir, run_name),
    ))


def _show_training_samples(run_dir: str, run_name: str) -> None:
    """The growing grid of the samples drawn while training, as the run's one artifact (updated
    after every set); a failing artifact call is logged, never the segment's failure."""
    try:
        publish_training_samples(run_dir, run_name)
    except Exception as exc:  # noqa: BLE001 - a display must not fail training
        get_run_logger().warning("could not update the training-samples artifact: %s", exc)
