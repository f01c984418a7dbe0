"""Batches that fit the card: run work in batches and, out of memory, smaller ones.

Why: a user's card is not ours. The latent cache's VAE and the validation's UNet calls both
start with a batch sized for a large card; an out-of-memory error cuts the failed batch and
every later one smaller and runs them again, down to one item, instead of failing the run.
(A training step has its own retry: lora/train/step/pipeline.py halves its micro-batches.)
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence, TypeVar

from lora.train.errors import is_out_of_memory, one_line

log = logging.getLogger(__name__)
T = TypeVar("T")


def smaller_batch(current: int, failed: int) -> int:
    """The batch to try after ``failed`` items ran out of memory: ``current`` halved until it is
    below ``failed`` (at least 1)."""
    batch = max(1, current // 2)
    while batch >= failed and batch > 1:
        batch //= 2
    return batch


def free_cached_memory(device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error (CUDA only), so the
    smaller retry has the room; call it outside the ``except`` block, whose traceback pins the
    failed attempt's tensors."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def fitting_batches(groups: Sequence[Sequence[int]], size: int, run: Callable[[list[int]], T], *, device,
                    what: str, on_smaller: Callable[[int], None] | None = None) -> Iterator[tuple[list[int], T]]:
    """``(batch, run(batch))`` for each group of indices cut into batches of at most ``size``
    (a batch never mixes groups). Out of memory, the failed batch and the ones after it are
    cut smaller and run again; ``on_smaller`` hears each new size (a caller keeps it for
    next time). Out of memory with a batch of one, and any other error, propagate."""
    queue = _cut(groups, max(1, size))
    while queue:
        batch = queue.pop(0)
        oom = None
        try:
            result = run(batch)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(batch) == 1:
                raise
            oom = one_line(exc, 200)  # the text only: the traceback pins the failed activations
        if oom is None:
            yield batch, result
            continue
        free_cached_memory(device)
        size = smaller_batch(size, len(batch))
        log.warning("out of memory %s, %d at once (%s): going on %d at a time", what, len(batch), oom, size)
        queue = _cut([batch, *queue], size)
        if on_smaller is not None:
            on_smaller(size)


def _cut(groups: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    return [list(g[k:k + size]) for g in groups for k in range(0, len(g), size)]
