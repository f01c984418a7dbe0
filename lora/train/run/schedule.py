"""When the loop works between steps, and when it stops: one small scheduler.

Between two steps the loop asks the :class:`Schedule` which actions are due at this
:class:`Boundary`, and runs them itself (the schedule says *when*, the loop does *what*, so
nothing here calls back into the loop). Each action says when it is due and what it needs:

- ``needs_drained``: the step in flight must be read first (lora/train/step/pipeline.py),
  because the action uses the training log or the weights as they are after the step;
- ``main_only``: only the main process runs it (several processes hold the same weights).

Before each step the loop asks :meth:`Schedule.stop_reason`; a stop rule that one process
alone could decide (a time budget, a signal) is agreed by all processes, so they stop at the
same step instead of one waiting forever in the next all-reduce.

A new periodic action (EMA, a callback, another schedule) is a small :class:`Action` subclass
added to the list the loop builds, and one line in the loop that does it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from lora.train.step.pipeline import StepPipeline

    from .interrupt import StopSignals
    from .log import TrainingLog

log = logging.getLogger(__name__)

#: Kept free before a time budget ends, on top of the predicted step and checkpoint time.
BUDGET_MARGIN_S = 1.0


@dataclass(frozen=True)
class Boundary:
    """The loop right after it queued ``step``."""

    step: int
    #: the epoch ``step`` belongs to
    epoch: int
    #: ``step`` was its epoch's last step
    epoch_done: bool
    #: ``step`` was the run's last step
    last: bool


class Action:
    """Periodic work between steps (see the module docstring)."""

    name = "action"
    needs_drained = False
    main_only = False

    def due(self, at: Boundary) -> bool:
        raise NotImplementedError

    def done(self) -> None:
        """The loop ran the action (a timer starts again)."""


class Validation(Action):
    """Validation loss every ``every_steps`` steps, else at each epoch's end, and at the last step."""

    name = "validation"
    needs_drained = True

    def __init__(self, every_steps: int | None) -> None:
        self.every_steps = every_steps

    def due(self, at: Boundary) -> bool:
        if at.last:
            return True
        return at.step % self.every_steps == 0 if self.every_steps else at.epoch_done


class Samples(Action):
    """A set of samples (lora/train/samples.py) at the end of the chosen epochs, or every
    ``every_steps`` steps, and at the last step; never twice for one global step: the steps
    already drawn are read from the training log, which every checkpoint carries, so a resumed
    run neither repeats a set nor skips one."""

    name = "samples"
    needs_drained = True
    main_only = True

    def __init__(self, epochs: set[int] | None, every_steps: int | None, training_log: "TrainingLog") -> None:
        self.epochs, self.every_steps, self.training_log = epochs or set(), every_steps, training_log

    def due(self, at: Boundary) -> bool:
        if at.last:
            on_cadence = True
        elif self.every_steps:
            on_cadence = at.step % self.every_steps == 0
        else:
            on_cadence = at.epoch_done and at.epoch in self.epochs
        # the log is read only at a cadence step, not at every step of the loop
        return on_cadence and at.step not in self.training_log.sample_steps()


class Checkpoint(Action):
    """A checkpoint every ``every_steps`` steps and/or ``every_minutes`` minutes (the last
    step's checkpoint is written when the run completes)."""

    name = "checkpoint"
    needs_drained = True
    main_only = True

    def __init__(self, every_steps: int | None, every_minutes: float | None) -> None:
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last_saved_at = time.monotonic()

    def due(self, at: Boundary) -> bool:
        if at.last:
            return False
        by_steps = bool(self.every_steps) and at.step % self.every_steps == 0
        by_time = bool(self.every_minutes) and time.monotonic() - self.last_saved_at >= self.every_minutes * 60
        return by_steps or by_time

    def done(self) -> None:
        self.last_saved_at = time.monotonic()


class Progress(Action):
    """``on_progress({step, total_steps, epoch, loss, lr, eta_s, images_per_sec})`` once for
    every step read, in order. A broken progress display never stops training."""

    name = "progress"
    main_only = True

    def __init__(self, report: Callable[[dict], None], training_log: "TrainingLog", total_steps: int,
                 pipeline: "StepPipeline") -> None:
        self.report, self.training_log, self.total_steps, self.pipeline = report, training_log, total_steps, pipeline
        self.reported_step = training_log.global_step

    def due(self, at: Boundary) -> bool:
        return True

    def report_new_steps(self) -> None:
        """Report every logged step not reported yet (between steps and once at the end)."""
        for record in self.training_log.steps_after(self.reported_step):
            self.reported_step = record["step"]
            self._call({
                "step": record["step"], "total_steps": self.total_steps, "epoch": record["epoch"],
                "loss": record["loss"], "lr": record["lr"],
                "eta_s": self.pipeline.mean_step_s * (self.total_steps - record["step"]),
                "images_per_sec": record["images_per_sec"],
            })

    def _call(self, info: dict[str, Any]) -> None:
        try:
            self.report(info)
        except Exception as exc:  # noqa: BLE001 - a broken progress display must not stop training
            log.warning("progress callback failed: %s", exc)


class StopRule:
    """Something that ends a segment before its next step; ``reason`` is what the result says."""

    reason = "stopped"

    def should_stop(self, global_step: int) -> bool:
        raise NotImplementedError


class StepTarget(StopRule):
    reason = "step-target"

    def __init__(self, stop_at_step: int | None) -> None:
        self.stop_at_step = stop_at_step

    def should_stop(self, global_step: int) -> bool:
        return self.stop_at_step is not None and global_step >= self.stop_at_step


class TimeBudget(StopRule):
    """Stop when the next step (and the one in flight), a validation and the checkpoint would
    not fit before ``deadline`` any more; the loop keeps ``reserved_s`` at the time of the last
    checkpoint plus the last validation."""

    reason = "time-budget"

    def __init__(self, deadline: float, pipeline: "StepPipeline", agree: Callable[[bool], bool],
                 reserved_s: float = 0.0) -> None:
        self.deadline, self.pipeline, self.agree, self.reserved_s = deadline, pipeline, agree, reserved_s

    def should_stop(self, global_step: int) -> bool:
        slowest = self.pipeline.slowest_step_s
        in_flight = slowest if self.pipeline.in_flight is not None else 0.0
        predicted = slowest + in_flight + self.reserved_s + BUDGET_MARGIN_S
        return self.agree(time.monotonic() + predicted > self.deadline)


class Interrupted(StopRule):
    """SIGINT / SIGTERM received (lora/train/run/interrupt.py), on any process."""

    reason = "interrupted"

    def __init__(self, signals: "StopSignals", agree: Callable[[bool], bool]) -> None:
        self.signals, self.agree = signals, agree

    def should_stop(self, global_step: int) -> bool:
        return self.agree(self.signals.requested)


class Schedule:
    """The stop rules, checked in order before each step, and the actions between steps."""

    def __init__(self, stops: list[StopRule], actions: list[Action], *, is_main: bool) -> None:
        self.stops = stops
        self.actions = [a for a in actions if is_main or not a.main_only]

    def stop_reason(self, global_step: int) -> str | None:
        for rule in self.stops:
            if rule.should_stop(global_step):
                return rule.reason
        return None

    def due(self, at: Boundary) -> list[Action]:
        return [a for a in self.actions if a.due(at)]

    @staticmethod
    def needs_drained(due: list[Action]) -> bool:
        return any(a.needs_drained for a in due)
