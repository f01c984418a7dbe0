"""CPU threads of a training run on a GPU.

Why: on a GPU the host's share of a step is small (drawing the next step's noise, stacking
cached latents and text), yet torch runs each such op on every core with OpenMP threads that
spin while they wait for work. Two processes doing this on one host wait on each other's
spinning threads: on this project's 2-core machine the host part of a batch-32 step took
3.5 ms alone or with one thread per process, and 250 ms with two processes side by side at the
default thread count (``python bench/host_threads.py``). Two single-GPU trainings on one
2xH200 host (one Prefect worker per GPU, docs/gpu.md) measured 63 images/s each at batch 32
against 158-169 alone: ~0.3 s more a step, the size of that wait (not yet re-measured there
with one thread). torchrun sets ``OMP_NUM_THREADS=1`` for its processes for the same reason;
a training on a GPU now does so itself.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

#: torch CPU threads while a run trains on a GPU (set OMP_NUM_THREADS to choose another number)
GPU_RUN_THREADS = 1


@contextlib.contextmanager
def host_threads_for(cuda: bool) -> Iterator[int]:
    """Use :data:`GPU_RUN_THREADS` torch CPU threads inside the block when training on a GPU,
    unless ``OMP_NUM_THREADS`` is set (the user's or torchrun's choice stands); the process's
    previous setting is restored afterwards (a Prefect worker runs other work in-process).
    A run on the CPU keeps every thread: there the arithmetic itself is on the host.
    Yields the thread count in effect."""
    if not cuda or os.environ.get("OMP_NUM_THREADS"):
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    torch.set_num_threads(GPU_RUN_THREADS)
    try:
        yield GPU_RUN_THREADS
    finally:
        torch.set_num_threads(before)
