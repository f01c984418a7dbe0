"""Bucketed, seeded batch order: which images each optimizer step sees.

The order of epoch ``e`` is a pure function of (seed, e): images are permuted within their
bucket, cut into batches (a batch never mixes buckets), the batches are permuted, and
``gradient_accumulation`` consecutive batches form one optimizer step. A checkpoint only
needs (epoch, step in epoch) to continue exactly where it stopped.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch

from lora.train.seeds import generator

Bucket = tuple[int, int]


def epoch_batches(buckets: Sequence[Bucket], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches (lists of item indices) for 1-based ``epoch``."""
    g = generator(seed, "epoch-order", epoch)
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    for i, b in enumerate(buckets):
        by_bucket[tuple(b)].append(i)
    batches: list[list[int]] = []
    for key in sorted(by_bucket):
        idx = by_bucket[key]
        perm = torch.randperm(len(idx), generator=g).tolist()
        shuffled = [idx[p] for p in perm]
        batches.extend(shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size))
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[o] for o in order]


def epoch_steps(
    buckets: Sequence[Bucket], batch_size: int, accumulation: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Optimizer steps of an epoch: each a list of up to ``accumulation`` micro-batches."""
    batches = epoch_batches(buckets, batch_size, seed, epoch)
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def steps_per_epoch(buckets: Sequence[Bucket], batch_size: int, accumulation: int) -> int:
    counts: dict[Bucket, int] = defaultdict(int)
    for b in buckets:
        counts[tuple(b)] += 1
    n_batches = sum(math.ceil(c / batch_size) for c in counts.values())
    return math.ceil(n_batches / accumulation)


def split_micro_batches(step: list[list[int]], divisor: int) -> list[list[int]]:
    """Cut each micro-batch into ``divisor`` parts (OOM fallback); empty parts are dropped."""
    if divisor <= 1:
        return [list(m) for m in step]
    out: list[list[int]] = []
    for micro in step:
        size = math.ceil(len(micro) / divisor)
        out.extend(micro[i:i + size] for i in range(0, len(micro), size))
    return out
