"""Progress of long work inside the library (the latent cache, sample images) for people.

On a terminal a tqdm bar; anywhere else (a pipe, a log file, a Prefect worker, whose UI shows
the library's log lines) plain log lines: the first item, one every ``every_s`` seconds and the
last, each with the rate and an ETA. Why: the latent cache of a few thousand images takes
minutes on a small card, and a run that prints nothing for minutes looks hung.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, TextIO

log = logging.getLogger(__name__)


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def count_line(label: str, done: int, total: int | None, rate: float | None, unit: str = "img") -> str:
    """``caching latents: 30/300 img (10%), 2.1 img/s, eta 2:08``."""
    text = f"{label}: {done}"
    text += f"/{total} {unit} ({done / total:.0%})" if total else f" {unit}"
    if rate:
        text += f", {rate:.1f} {unit}/s"
        if total:
            text += f", eta {format_duration((total - done) / rate)}"
    return text


class Progress:
    """``with Progress(total, "caching latents") as bar: ... bar.update(n)``.

    ``emit`` takes each plain line (default: ``logger.info``; the CLI prints to its stream);
    ``file`` is where a terminal bar goes. ``total`` None: a count without a known end."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "img", logger: logging.Logger | None = None,
                 emit: Callable[[str], None] | None = None, file: TextIO | None = None, leave: bool = False,
                 every_s: float = 15.0, interactive: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.emit = emit or (logger or log).info
        self.every_s, self.clock = every_s, clock
        stream = file if file is not None else sys.stderr
        isatty = getattr(stream, "isatty", None)
        self.interactive = bool(isatty and isatty()) if interactive is None else interactive
        self.done = 0
        self._bar: Any = None
        self._started: float | None = None
        self._last: float | None = None
        self._base = 0
        if self.interactive and total != 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=file)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.total == 0:
            return
        now = self.clock()
        if self._started is None:  # the rate counts from the first update, not from the set-up
            self._started, self._base = now, self.done
        rate = (self.done - self._base) / (now - self._started) if now > self._started else None
        last = self.total is not None and self.done >= self.total
        if self._last is None or last or now - self._last >= self.every_s:
            self.emit(count_line(self.desc, self.done, self.total, rate, self.unit))
            self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
