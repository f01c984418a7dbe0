"""A minimum-interval rate limiter shared by threads that call the same API."""
from __future__ import annotations

import threading
import time


class RateLimiter:
    """Spaces calls at least 1/rate seconds apart (start to start). Thread-safe.

    A simple interval rather than a token bucket: Danbooru asks long sessions to stay near a
    steady 1 request/s, so bursts are not wanted.
    """

    def __init__(self, requests_per_second: float) -> None:
        self.interval = 1.0 / requests_per_second
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> float:
        """Block until the next call may start; return the seconds slept."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        delay = start - now
        if delay > 0:
            time.sleep(delay)
        return delay
