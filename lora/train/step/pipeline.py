"""The optimizer steps between the loop and the GPU: queued, at most one in flight, read back in order.

The loop hands a step to :meth:`StepPipeline.queue` and gets back, as values, the steps whose
loss was read meanwhile (:class:`FinishedStep`) and, after an out-of-memory retry, the event to
log: nothing here calls back into the loop.

Why a step can be in flight: reading a step's loss makes the host wait for the GPU. With
``overlap_steps`` the pipeline queues step n+1 before it reads step n, so the card never
waits for the host's logging; the loop drains the pipeline (reads the step in flight) before
anything that needs the log or the weights as they are (an epoch's end, validation, a
checkpoint, the end of the segment).

Out of memory while queueing a step: the step is queued again once with micro-batches half
the size and twice the accumulation, so the effective batch (and what is trained) stays the
same; a step that still does not fit stops training with one clear line.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from lora.config import TrainConfig
from lora.train.errors import NonFiniteLossError, TrainingError, is_out_of_memory, one_line

from .executor import PendingStep
from .runner import StepRunner

log = logging.getLogger(__name__)


@dataclass
class InFlightStep:
    """A step whose GPU work is queued and whose loss has not been read yet."""

    step: int
    epoch: int
    lr: float
    queued_at: float
    images: int
    #: micro-batches were ``batch_size / divisor`` (2 after an out-of-memory retry)
    divisor: int
    oom_retry: bool
    result: PendingStep
    #: the training-log event of an out-of-memory retry, for the loop to record
    oom_event: dict[str, Any] | None = None


@dataclass
class FinishedStep:
    """A step whose loss and gradient norm have been read (both finite)."""

    step: int
    epoch: int
    lr: float
    loss: float
    #: None: an fp16 step whose gradients overflowed, so the optimizer skipped it
    grad_norm: float | None
    #: time since the step before was read (with overlapped steps, its share of the GPU time)
    seconds: float
    images: int
    divisor: int
    oom_retry: bool

    def log_record(self, cfg: TrainConfig) -> dict[str, Any]:
        """The step's record in ``training_log.json``."""
        record: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
            "images_per_sec": self.images / self.seconds if self.seconds > 0 else None, "images": self.images,
        }
        if self.oom_retry or self.divisor > 1:
            record["micro_batch"] = math.ceil(cfg.batch_size / self.divisor)
            record["gradient_accumulation"] = cfg.gradient_accumulation * self.divisor
        if self.oom_retry:
            record["oom_retry"] = True
        if self.grad_norm is None:
            record["skipped"] = "fp16 overflow"
        return record


class StepPipeline:
    """Queues steps on a :class:`~lora.train.step.runner.StepRunner` and returns each read step,
    in step order."""

    def __init__(self, runner: StepRunner, cfg: TrainConfig) -> None:
        self.runner, self.cfg = runner, cfg
        self.in_flight: InFlightStep | None = None
        self.fp16 = str(runner.accelerator.mixed_precision) == "fp16"
        self._last_read = time.monotonic()
        self._recent_s: deque[float] = deque(maxlen=8)

    # -- what the loop asks ------------------------------------------------------------------

    @property
    def slowest_step_s(self) -> float:
        """The slowest of the last few steps (0 before the first one was read)."""
        return max(self._recent_s) if self._recent_s else 0.0

    @property
    def mean_step_s(self) -> float:
        return sum(self._recent_s) / len(self._recent_s) if self._recent_s else 0.0

    def queue(self, step: int, epoch: int, batches: list[list[int]], divisor: int,
              upcoming: tuple[int, list[list[int]]] | None) -> tuple[InFlightStep, list[FinishedStep]]:
        """Queue ``step`` (its micro-batches ``batch_size / divisor``); then read the step queued
        before it, or, without overlapped steps, this one. ``upcoming`` = (number, batches) of
        the next step, whose inputs the runner prepares while this one runs. Returns the queued
        step and the steps read meanwhile, oldest first."""
        lr = self.runner.learning_rate()
        queued = self._queue_with_oom_retry(step, epoch, lr, batches, divisor, upcoming)
        finished = self.drain()  # the step before, read while this one runs on the GPU
        self.in_flight = queued
        if not self.runner.overlaps_steps:
            finished += self.drain()
        return queued, finished

    def drain(self) -> list[FinishedStep]:
        """Read the step in flight, if any (waits for its GPU work): [] or [that step]."""
        step, self.in_flight = self.in_flight, None
        return [] if step is None else [self._read(step)]

    # -- inside ------------------------------------------------------------------------------

    def _read(self, q: InFlightStep) -> FinishedStep:
        loss, grad_norm = q.result.values()
        # fp16: an overflowing gradient is the loss scaler's business (the update was skipped
        # and the scale halved), not a divergence; only a non-finite loss is
        skipped = self.fp16 and math.isfinite(loss) and not math.isfinite(grad_norm)
        if not (math.isfinite(loss) and (math.isfinite(grad_norm) or skipped)):
            # The optimizer has already applied this step in memory (and with overlapped steps
            # the next one too), so stop before anything is saved: a retry resumes from the last
            # good checkpoint on disk, and a run that diverges the same way every time fails
            # with this message instead of looping.
            raise NonFiniteLossError(
                f"non-finite loss at step {q.step} (loss {loss}, gradient norm {grad_norm}); "
                "nothing after the last checkpoint was saved. If it repeats, lower learning_rate, "
                "set max_grad_norm, or use mixed_precision=bf16 instead of fp16"
            )
        now = time.monotonic()
        seconds = now - max(q.queued_at, self._last_read)  # overlapped: the time since the step before was read
        self._last_read = now
        self._recent_s.append(seconds)
        return FinishedStep(q.step, q.epoch, q.lr, loss, None if skipped else grad_norm, seconds, q.images,
                            q.divisor, q.oom_retry)

    def _queue_with_oom_retry(self, step: int, epoch: int, lr: float, batches: list[list[int]], divisor: int,
                              upcoming: tuple[int, list[list[int]]] | None) -> InFlightStep:
        """Queue a step; out of memory: retry once with micro-batches half the size (same
        effective batch)."""
        cfg = self.cfg
        queued_at = time.monotonic()
        images = sum(len(b) for b in batches)
        try:
            result = self.runner.queue(step, batches, divisor, upcoming)
            return InFlightStep(step, epoch, lr, queued_at, images, divisor, False, result)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # keep only the text: the traceback pins the failed step's activations in memory
            oom_message = one_line(exc, 200)
        biggest = max(len(b) for b in batches)
        if math.ceil(biggest / divisor) <= 1:
            raise TrainingError(
                f"out of memory at step {step} with a micro-batch of 1 ({oom_message}); enable "
                "low_memory (or gradient_checkpointing), use mixed_precision=bf16 or a lower resolution"
            )
        self.runner.release_failed_step()
        divisor *= 2
        micro = math.ceil(cfg.batch_size / divisor)
        log.warning("out of memory at step %d: retrying with micro-batch %d and %dx accumulation "
                    "(same effective batch of %d)", step, micro,
                    cfg.gradient_accumulation * divisor, cfg.batch_size * cfg.gradient_accumulation)
        event = {
            "step": step, "event": "oom-retry", "micro_batch": micro,
            "gradient_accumulation": cfg.gradient_accumulation * divisor,
            "effective_batch": cfg.batch_size * cfg.gradient_accumulation,
        }
        try:
            result = self.runner.queue(step, batches, divisor, upcoming)
        except Exception as again:
            if is_out_of_memory(again):
                raise TrainingError(
                    f"out of memory at step {step} even with micro-batch {micro}; enable "
                    "low_memory (or gradient_checkpointing), use mixed_precision=bf16, or lower batch_size/resolution"
                ) from None
            raise
        return InFlightStep(step, epoch, lr, queued_at, images, divisor, True, result, event)
