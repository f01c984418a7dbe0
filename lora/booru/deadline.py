"""Time limits for one file download that a slow server cannot reset.

Why this exists: a socket's read timeout only bounds the wait for the *next* byte. A server that
sends one byte every 2 s resets it forever, so a download (and with it the whole fetch) never
ends. Two limits close that hole:

- :class:`Deadline`, the total time one file may take (every attempt, retry and backoff
  included). When it passes, a timer thread shuts the connection's socket down, which wakes a
  read blocked anywhere: while the status line and headers trickle in, or the body.
- :class:`StallMeter`, a floor on the transfer rate: fewer than ``min_rate * window`` bytes in
  ``window`` seconds is a stall, checked as bytes arrive.

The timer finds the socket through :class:`GuardedAdapter`, mounted on the file session: its
connections hand their socket to the :class:`Deadline` of the thread that uses them, just
before the response is read.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["Deadline", "StallMeter", "GuardedAdapter", "active_deadline"]

_local = threading.local()


class Deadline:
    """The moment one file's download must be over; a context manager that arms a timer.

    While active (``with deadline:``), connections used by this thread register their socket
    (:meth:`watch`); when the time is up the socket is shut down, so the blocked read fails at
    once and :attr:`expired` tells the caller why.
    """

    def __init__(self, seconds: float, clock: Any = time.monotonic) -> None:
        self.seconds = float(seconds)
        self._clock = clock
        self.end = clock() + self.seconds
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._fired = False
        self._timer: threading.Timer | None = None

    @property
    def expired(self) -> bool:
        """Whether the timer fired or the time is up."""
        return self._fired or self.remaining() <= 0

    def remaining(self) -> float:
        return self.end - self._clock()

    def watch(self, sock: socket.socket | None) -> None:
        """Remember the socket to cut when the time is up (the last one registered wins)."""
        with self._lock:
            self._sock = sock
            fired = self._fired
        if fired:
            self._cut(sock)

    def release(self) -> None:
        """Forget the socket: the connection goes back to the pool for another download."""
        with self._lock:
            self._sock = None

    def expire(self) -> None:
        """End the download now, as if the time were up."""
        self._fire()

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            sock = self._sock
        self._cut(sock)

    @staticmethod
    def _cut(sock: socket.socket | None) -> None:
        if sock is None:
            return
        try:
            # The plain socket's shutdown, also for TLS sockets: it wakes the reading thread
            # without touching the TLS object that thread is using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "Deadline":
        self._timer = threading.Timer(max(0.0, self.remaining()), self._fire)
        self._timer.daemon = True
        self._timer.start()
        self._previous = getattr(_local, "deadline", None)
        _local.deadline = self
        return self

    def __exit__(self, *exc: object) -> None:
        _local.deadline = self._previous
        if self._timer is not None:
            self._timer.cancel()
        self.release()


def active_deadline() -> Deadline | None:
    """The :class:`Deadline` this thread's download runs under, if any."""
    return getattr(_local, "deadline", None)


class StallMeter:
    """Detects a transfer slower than ``min_rate`` bytes/s for ``window`` seconds.

    Every ``min_rate * window`` bytes received restart the window; a window that runs out before
    its bytes have arrived is a stall. O(1) per chunk, no history kept. ``received`` counts all
    bytes so far.
    """

    def __init__(self, window: float, min_rate: float, clock: Any = time.monotonic) -> None:
        self.window = float(window)
        self.quota = max(1, int(min_rate * window))
        self._clock = clock
        self._since = clock()
        self._got = 0
        self.received = 0

    def add(self, nbytes: int) -> None:
        self.received += nbytes
        self._got += nbytes
        if self._got >= self.quota:
            self._got = 0
            self._since = self._clock()

    def stalled(self) -> bool:
        return self._clock() - self._since > self.window


def _register(conn: HTTPConnection) -> None:
    deadline = active_deadline()
    if deadline is not None:
        deadline.watch(conn.sock)


class _GuardedHTTPConnection(HTTPConnection):
    def getresponse(self):  # type: ignore[override]
        _register(self)
        return super().getresponse()


class _GuardedHTTPSConnection(HTTPSConnection):
    def getresponse(self):  # type: ignore[override]
        _register(self)
        return super().getresponse()


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose connections register their socket with the thread's
    :class:`Deadline` (a no-op outside one)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
