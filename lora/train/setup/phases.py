"""Seconds of each part of a segment's set-up, for the segment record (lora/train/run/stats.py).

Why: a fresh run spent 35 s in set-up on an H100 (tenth session) and nobody could say whether
the model load, the latent cache or moving the UNet took it; a speed change to set-up needs the
split before and after. Each mark waits for the card, so a part's time includes its GPU work.
"""
from __future__ import annotations

import time

import torch


class PhaseClock:
    """``mark(name)`` closes the part that ran since the last mark (or since the clock started)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        #: seconds by part, in the order they ran
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.monotonic()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now
