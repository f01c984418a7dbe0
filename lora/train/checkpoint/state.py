"""Where a run stands between two steps: the counters a checkpoint's ``state.json`` holds.

The on-disk format is the plain JSON object it has always been (six keys); this class only
gives the loop names and types instead of string keys, converted at the checkpoint boundary.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RunState:
    #: optimizer steps done (the last one queued, while a step is in flight)
    global_step: int = 0
    #: the epoch the next step belongs to (1-based)
    epoch: int = 1
    #: steps of ``epoch`` already done: where the epoch's data order continues
    step_in_epoch: int = 0
    #: micro-batches are ``batch_size / micro_batch_divisor`` (doubled by an out-of-memory retry)
    micro_batch_divisor: int = 1
    #: training time summed over segments (the time between step reads)
    train_time_s: float = 0.0
    images_seen: int = 0

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> "RunState":
        """From a checkpoint's ``state.json``; a key it lacks keeps its default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_checkpoint(self) -> dict[str, Any]:
        """The ``state.json`` object (same keys and order as every earlier checkpoint)."""
        return asdict(self)

    @property
    def last_epoch(self) -> int:
        """The epoch of the last step done (``epoch`` already points at the next one when an
        epoch has just ended)."""
        return self.epoch - (1 if self.step_in_epoch == 0 else 0)

    def step_queued(self, images: int, divisor: int) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        self.images_seen += images
        self.micro_batch_divisor = divisor

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
