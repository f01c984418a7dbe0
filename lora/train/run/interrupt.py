"""Ctrl-C (SIGINT) and SIGTERM while a segment trains: stop cleanly, resumable.

A Colab stop, ``docker stop``, a batch scheduler's pre-emption and a Prefect cancellation all
send one of these; before, the process died and lost everything since the last checkpoint
(up to the checkpoint interval of GPU work). While :func:`lora.train.train` runs in the main
thread:

- the first signal logs one line and asks the loop to stop: it finishes the current step,
  writes a checkpoint and ``training_log.json`` and returns ``stopped_reason="interrupted"``
  (``animelora train`` exits 3: re-run the same command to continue);
- a second signal exits at once, without a checkpoint: exit status 128 + the signal number
  (130 for SIGINT, 143 for SIGTERM), what a shell reports for a process the signal killed.

The handlers that were installed before are put back when ``train`` returns. In another
thread (signals can only be handled in the main thread) nothing is installed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: A repeat within this many seconds counts as the same request: a launcher (torchrun,
#: ``accelerate launch``) passes on the Ctrl-C that the terminal already sent to every process.
REPEAT_WINDOW_S = 0.5


class StopSignals:
    """Whether a stop was asked for by a signal; :meth:`installed` handles SIGINT / SIGTERM."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _on_signal(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._received_at < REPEAT_WINDOW_S:
                return
            print(f"{name} again: stopping at once, without a checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        self.received, self._received_at = signum, time.monotonic()
        log.warning("%s received: stopping after the current step with a checkpoint "
                    "(send it again to stop at once, without one)", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, object] = {}
        try:
            for sig in SIGNALS:
                previous[sig] = signal.signal(sig, self._on_signal)
            yield self
        finally:
            for sig, handler in previous.items():
                # None: a handler installed outside Python, which cannot be put back; the default
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
