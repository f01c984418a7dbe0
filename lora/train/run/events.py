"""TensorBoard event files in ``RUN/tensorboard/`` (``tensorboard --logdir <workspace>/runs``).

What is written, by global step: ``train/loss``, ``train/lr``, ``train/grad_norm`` and
``train/images_per_sec`` of every step; ``train/epoch_loss`` (the guide's per-epoch mean) at
each epoch's last step (and at the last step of a run that ends inside an epoch);
``validation/loss`` with ``validation/ci95_low`` / ``ci95_high`` (a
95% Student-t interval of the mean over the held-out images) and ``validation/t<timestep>``;
and ``samples``, each set drawn while training as one image strip.

Why the ``tensorboard`` package's writer (``torch.utils.tensorboard``): it is what kohya,
diffusers' scripts and OneTrainer write, so the same ``tensorboard`` command reads all of them.

Resume-safe: a segment opens a new event file whose first event purges every event at or after
the step it resumes from (``purge_step``), so steps that a killed segment logged after its last
checkpoint, and that the next segment trains again, appear once; TensorBoard drops the older
copies. Only the main process writes. Events are flushed at every checkpoint and when the
segment ends. A missing ``tensorboard`` package costs a warning, never the run.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


class EventLog:
    """One segment's TensorBoard writer (see the module docstring)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, folder: Path, resume_step: int) -> "EventLog | None":
        """A writer into ``folder`` for a segment that trains from ``resume_step`` on; None (and
        one warning) when the ``tensorboard`` package is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log.warning("no TensorBoard event files for this run (%s); pip install tensorboard", exc)
            return None
        folder.mkdir(parents=True, exist_ok=True)
        # a fresh run re-logs step 0 (the base model's validation and samples); a resumed one
        # starts after its checkpoint's step, whose events are already on disk
        purge = resume_step + 1 if resume_step > 0 else 0
        return cls(SummaryWriter(log_dir=str(folder), purge_step=purge, flush_secs=30))

    def step(self, record: dict[str, Any]) -> None:
        """One step of ``training_log.json``'s ``steps``."""
        step = int(record["step"])
        for key in ("loss", "lr", "grad_norm", "images_per_sec"):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, step)

    def epoch(self, step: int, loss: float | None) -> None:
        if loss is not None and math.isfinite(loss):
            self.writer.add_scalar("train/epoch_loss", loss, step)

    def validation(self, step: int, result: dict[str, Any]) -> None:
        """A validation record (lora/train/validation.py): mean, its interval, each timestep."""
        self.writer.add_scalar("validation/loss", result["loss"], step)
        interval = mean_interval([sum(v) / len(v) for v in (result.get("per_image") or {}).values() if v])
        if interval is not None:
            self.writer.add_scalar("validation/ci95_low", interval[0], step)
            self.writer.add_scalar("validation/ci95_high", interval[1], step)
        for timestep, value in (result.get("per_timestep") or {}).items():
            self.writer.add_scalar(f"validation/t{timestep}", value, step)

    def samples(self, step: int, strip: Any) -> None:
        """A set drawn while training, as one HWC uint8 image strip."""
        self.writer.add_image("samples", strip, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t interval of the mean of ``values``; None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half
