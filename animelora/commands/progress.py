"""Training progress for people: a tqdm bar (or plain lines when stderr is not a terminal).

Built on the loop's ``on_progress`` callback (one dict per optimizer step: step, total_steps,
epoch, loss, lr, images_per_sec) plus the validation losses the trainer logs. Why not the
loop's own ``eta_s``: it averages the last few steps only from the start of this process, so
the first steps (model load, caches, compilation) make it jump; here the ETA comes from the
rate over a moving window of recent steps, shown only once two steps have been seen.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Any, Callable, TextIO

from lora.progress import Progress, format_duration

#: The logger the trainer reports validation losses on (``extra={"validation_loss": ...}``).
VALIDATION_LOGGER = "lora.train.validation"
#: Libraries that log through handlers of their own (not the root logger's).
LIBRARY_LOGGERS = ("transformers", "diffusers")


class _ValidationListener(logging.Handler):
    def __init__(self, sink: Callable[[float], None]) -> None:
        super().__init__(level=logging.INFO)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        value = getattr(record, "validation_loss", None)
        if isinstance(value, (int, float)):
            self._sink(float(value))


def _libraries_with_own_handler() -> list[logging.Logger]:
    """Library loggers that already write to the console themselves. One without such a
    handler yet is left alone: redirecting it would print its lines twice once the library adds
    its own handler."""
    found = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if any(type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
               for h in logger.handlers):
            found.append(logger)
    return found


class TrainProgress:
    """Call with each ``on_progress`` dict; ``close()`` at the end (also a context manager).

    ``interactive`` (default: the stream is a terminal) draws a tqdm bar; otherwise one line
    every ``line_every`` steps and at the last step, so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None,
                 window: int = 20, line_every: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty()) if interactive is None else interactive
        self.line_every = max(1, line_every)
        self.clock = clock
        self.times: deque[tuple[float, int]] = deque(maxlen=max(2, window))
        self.last: dict[str, Any] = {}
        self.validation: float | None = None
        self.bar: Any = None
        self._printed_validation: float | None = None
        self._printed_step: int | None = None
        self._listener = _ValidationListener(self._on_validation)
        logger = logging.getLogger(VALIDATION_LOGGER)
        self._saved_level = logger.level
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)  # the records must exist for the bar to see them
        logger.addHandler(self._listener)

    # -- inputs ---------------------------------------------------------------------------
    def _on_validation(self, value: float) -> None:
        self.validation = value
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(), refresh=True)

    def __call__(self, info: dict[str, Any]) -> None:
        step = int(info.get("step") or 0)
        total = int(info.get("total_steps") or 0)
        self.times.append((self.clock(), step))
        self.last = info
        if self.interactive:
            self._draw(step, total)
        elif step != total and (step % self.line_every == 0 or step == 1):
            self._print_line()
        # the last step's line waits for close(): the run's final validation comes after it,
        # and one line should show both

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._printed_validation = self.validation
        self._printed_step = int(self.last.get("step") or 0)

    # -- derived values ---------------------------------------------------------------------
    def steps_per_second(self) -> float | None:
        """Rate over the moving window (None until two steps were seen)."""
        if len(self.times) < 2:
            return None
        (t0, s0), (t1, s1) = self.times[0], self.times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta_seconds(self) -> float | None:
        rate = self.steps_per_second()
        step = int(self.last.get("step") or 0)
        total = int(self.last.get("total_steps") or 0)
        if step >= total and total:
            return 0.0
        return (total - step) / rate if rate else None

    def postfix(self) -> str:
        info = self.last
        parts = []
        ips = info.get("images_per_sec")
        parts.append(f"{ips:.1f} img/s" if isinstance(ips, (int, float)) else "- img/s")
        loss = info.get("loss")
        parts.append(f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss -")
        parts.append(f"val {self.validation:.4f}" if self.validation is not None else "val -")
        parts.append(f"eta {format_duration(self.eta_seconds())}")
        return ", ".join(parts)

    def line(self) -> str:
        info = self.last
        return (f"step {info.get('step')}/{info.get('total_steps')} epoch {info.get('epoch')} "
                f"{self.postfix()}")

    # -- drawing ------------------------------------------------------------------------------
    def _draw(self, step: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=max(0, step - 1), unit="step", file=self.stream,
                            dynamic_ncols=True, desc="training",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}{postfix}]")
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.set_description_str(f"training (epoch {self.last.get('epoch')})", refresh=False)
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(max(0, step - self.bar.n))

    def logging_above_bar(self):
        """While training: log lines, the libraries' own included, are printed above the bar
        instead of through it (transformers and diffusers log through their own handlers)."""
        if not self.interactive:
            from contextlib import nullcontext

            return nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm(loggers=[logging.root, *_libraries_with_own_handler()])

    def close(self) -> None:
        logger = logging.getLogger(VALIDATION_LOGGER)
        logger.removeHandler(self._listener)
        logger.setLevel(self._saved_level)
        if not self.interactive and self.last and (
                self._printed_step != int(self.last.get("step") or 0)
                or self.validation != self._printed_validation):
            self._print_line()  # the last step, with the final validation that came after it
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(), refresh=True)
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountProgress:
    """Progress of ``fetch`` and ``import``: call with each ``on_progress`` event (one per image,
    with ``total`` and ``round``), ``close()`` at the end.

    On a terminal a tqdm bar per round (the total changes between rounds). Anywhere else (a
    pipe, a log file, a Prefect worker) plain lines: the first image, one every ``every_s``
    seconds and the round's last, each with the rate and an ETA, so a log shows the work moving
    without a line per image. Each round is one :class:`lora.progress.Progress`."""

    def __init__(self, desc: str, *, quiet: bool = False, stream: TextIO | None = None,
                 interactive: bool | None = None, every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc = desc
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty()) if interactive is None else interactive
        self.every_s = every_s
        self.clock = clock
        self._key: tuple[Any, Any] | None = None
        self._round: Progress | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        key = (event.get("round"), event.get("total"))
        if key != self._key:
            self._new_round(event)
            self._key = key
        self._round.update(1)  # type: ignore[union-attr]

    def _new_round(self, event: dict[str, Any]) -> None:
        self.close()
        round_no = event.get("round")
        label = f"{self.desc} (round {round_no})" if round_no and round_no > 1 else self.desc
        total = event.get("total")
        self._round = Progress(int(total) if isinstance(total, (int, float)) else None, label,
                               emit=lambda line: print(line, file=self.stream, flush=True), file=self.stream,
                               leave=True, every_s=self.every_s, interactive=self.interactive, clock=self.clock)

    def close(self) -> None:
        if self._round is not None:
            self._round.close()
