"""What one training segment cost before and while it trained, for ``training_log.json``.

Why: the number a user feels is the time to a trained LoRA, and most of what separates it
from steps × step time happens before the first step (model load, latent cache, compile and
CUDA-graph capture per bucket shape) or is held on the card (memory). Each segment appends
one record, so a benchmark or a user can see where a run's wall time and memory went.
"""
from __future__ import annotations

import time
from typing import Any

import torch


class SegmentStats:
    """Wall-clock marks of one segment, relative to its start; :meth:`record` makes the entry."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.started_at = time.time()
        self.setup_done_s: float | None = None
        self.first_step_s: float | None = None
        self.first_step = 0
        self.last_step = 0
        self.setup_max_reserved_gib: float | None = None
        #: seconds of each part of the set-up (lora/train/setup/phases.py)
        self.setup_parts: dict[str, float] = {}
        #: seconds of each thing done between steps, by kind ("validation", "samples",
        #: "checkpoint", "export"), in order (the first validation pays for the first eager kernels)
        self.each: dict[str, list[float]] = {}
        #: GiB the allocator holds right after each thing done between steps, by kind, and
        #: after the first step: which of them grew the memory held (the eager validation
        #: calls, the samples' decode, the graphs' pool) when the peak is above what was planned
        self.reserved_after: dict[str, list[float]] = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def setup_done(self, parts: dict[str, float] | None = None) -> None:
        """Models loaded, latents cached, LoRA attached: what follows is warm-up and steps.
        ``parts``: the set-up's seconds by part, kept in the record as ``setup_parts``.

        The set-up's memory peak (the VAE encoding new images for the latent cache, freed
        before training) is kept apart, so the segment's peak is what training holds."""
        self.setup_done_s = time.monotonic() - self.started
        self.setup_parts = dict(parts or {})
        if torch.cuda.is_available():
            self.setup_max_reserved_gib = _gib(torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

    def add(self, kind: str, seconds: float) -> None:
        """Time spent outside the steps (a validation, a checkpoint, the export): a run's wall
        time is set-up + warm-up + steps + these, and the record says so."""
        self.each.setdefault(kind, []).append(seconds)
        self._mark_reserved(kind)

    def _mark_reserved(self, kind: str) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.reserved_after.setdefault(kind, []).append(_gib(torch.cuda.memory_reserved()))

    def step_read(self, step: int) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.monotonic() - self.started
            self.first_step = step
            self._mark_reserved("first_step")
        self.last_step = step

    def record(self, runner: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "started_at": round(self.started_at, 3),
            "wall_s": round(time.monotonic() - self.started, 3),
            "setup_s": _round(self.setup_done_s),
            "setup_parts": self.setup_parts,
            "first_step_s": _round(self.first_step_s),
            "first_step": self.first_step, "last_step": self.last_step,
        }
        for kind, each in self.each.items():
            out[f"{kind}_s"] = round(sum(each), 3)
            out[f"{kind}_count"] = len(each)
            out[f"{kind}_each_s"] = [round(seconds, 3) for seconds in each]
        warmups = getattr(getattr(runner, "executor", None), "warmups", None)
        if warmups:
            out["graph_shapes"] = [list(w.shape) for w in warmups]
            out["graph_warmup_s"] = round(sum(w.seconds for w in warmups), 3)
            # each shape's own: the eager calls that warm it up (the first pays for the
            # library's kernel choice and loading), then the capture
            out["graph_warmups"] = [w.as_record() for w in warmups]
        fast = getattr(runner, "fast", None)
        if fast is not None:
            out["fast_path"] = {k: v for k, v in vars(fast).items()}
        if torch.cuda.is_available():
            out["gpu_max_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
            out["gpu_max_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
            out["setup_max_reserved_gib"] = self.setup_max_reserved_gib
            out["reserved_after_each_gib"] = {kind: list(each) for kind, each in self.reserved_after.items()}
        return out


def _gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
