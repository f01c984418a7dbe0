"""Images decoded and resized on worker threads, ahead of the VAE that encodes them.

Why: building the latent cache read, decoded, resized (Lanczos) and cropped each image on the
main thread while the card waited for it, then the card encoded while the CPU waited. PIL lets
go of the GIL while it decodes and resamples, so a few threads prepare the next images while
the VAE encodes these. The tensors are the same as one thread makes (each image is prepared
alone, by :func:`~lora.train.data.buckets.load_for_bucket`); only the order of work changes.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch

from .buckets import Bucket, load_for_bucket

#: worker threads that prepare images (at most the CPU cores, at most 8: beyond that the VAE,
#: not the CPU, sets the pace of the cache)
PREPARE_THREADS = max(1, min(8, os.cpu_count() or 1))
#: images prepared ahead of the one the VAE takes next (about 3 MB each at 512 px)
AHEAD = 32

T = TypeVar("T")
R = TypeVar("R")


def threaded_map(fn: Callable[[T], R], values: Iterable[T], threads: int = PREPARE_THREADS) -> list[R]:
    """``[fn(v) for v in values]`` on ``threads`` threads (for work that lets go of the GIL:
    hashing files, decoding images); the first error is raised as it would be in the loop."""
    values = list(values)
    if threads <= 1 or len(values) <= 1:
        return [fn(v) for v in values]
    with ThreadPoolExecutor(threads, thread_name_prefix="animelora-prepare") as pool:
        return list(pool.map(fn, values))


class PreparedImages:
    """``take(n)``: the next ``n`` of ``jobs`` (image path, bucket) as tensors for the VAE, in the
    order given; up to :data:`AHEAD` more are prepared meanwhile. A job that fails raises its
    error when it is taken, as preparing it in place would have. Use as a context manager: on
    leaving, work not yet started is cancelled."""

    def __init__(self, jobs: Sequence[tuple[Path, Bucket]], *, threads: int = PREPARE_THREADS,
                 ahead: int = AHEAD) -> None:
        self._jobs = list(jobs)
        self._submitted = 0
        self._ahead = max(1, ahead)
        self._pending: deque[Future[torch.Tensor]] = deque()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max(1, threads),
                                                                  thread_name_prefix="animelora-prepare")

    def __enter__(self) -> "PreparedImages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def take(self, n: int) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            self._fill()
            if not self._pending:
                raise IndexError("no more images to take")
            out.append(self._pending.popleft().result())
        self._fill()  # the next ones are prepared while the caller encodes these
        return out

    def _fill(self) -> None:
        """Keep ``ahead`` jobs submitted past the ones taken."""
        while self._pool is not None and len(self._pending) < self._ahead and self._submitted < len(self._jobs):
            path, bucket = self._jobs[self._submitted]
            self._pending.append(self._pool.submit(load_for_bucket, path, bucket))
            self._submitted += 1
