"""Data parallelism across processes (``accelerate launch`` / ``torchrun``), without a DDP wrapper.

Why not DDP: DDP all-reduces inside the backward pass, which cannot run inside the CUDA graphs
of the fast path (lora/train/step/graphed.py). Only the LoRA weights train (a few million fp32
values), so one all-reduce of one flat gradient buffer per optimizer step, between the
graphs, costs well under a millisecond, and every process keeps compile + CUDA graphs.

What stays the same as one process: every process draws the *whole* step's noise, timesteps
and flips from the same seeds and takes a contiguous share of each micro-batch; its loss is
divided by the step's total image count, so the summed gradients are exactly the gradient of
the step's mean loss, and every process applies the same optimizer update to the same
weights. Checkpoints therefore have the one-process format: a run may resume on another
number of GPUs (results agree to float rounding, the order of a sum changes).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch


def launched_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before any ``Accelerator`` exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_launched_process() -> bool:
    return launched_rank()[0] == 0


def rank_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, end) positions of ``rank``'s contiguous share of ``n`` items.

    Shares differ by at most one item; a process may get none when ``n < world``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class GradientSync:
    """One flat fp32 buffer holding every trainable parameter's ``.grad`` (as views).

    ``sum_(loss)`` adds the gradients and the step's partial loss of all processes in one
    all-reduce. The views must stay the parameters' gradients: zero them in place
    (:meth:`zero_`), never with ``zero_grad(set_to_none=True)``.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], device: torch.device) -> None:
        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        self.flat = torch.zeros(sum(sizes) + 1, dtype=torch.float32, device=device)
        self.views = []
        offset = 0
        for p, size in zip(self.params, sizes):
            view = self.flat[offset:offset + size].view_as(p)
            self.views.append(view)
            offset += size
        self.loss_slot = self.flat[offset:]
        self.attach()

    def attach(self) -> None:
        """Point every parameter's ``.grad`` at its view (again, if something replaced it)."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def zero_(self) -> None:
        self.attach()
        self.flat.zero_()

    def sum_(self, local_loss_sum: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) gradients and loss; returns the step's whole loss sum (a 0-d tensor)."""
        import torch.distributed as dist

        self.attach()
        self.loss_slot.copy_(local_loss_sum.reshape(1).to(self.flat.dtype))
        dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)
        return self.loss_slot[0].clone()


def any_process(flag: bool, device: torch.device, world: int) -> bool:
    """True on every process if ``flag`` is true on any (e.g. "the time budget is spent"),
    so all processes stop at the same step instead of one waiting forever in an all-reduce."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def close_process_group() -> None:
    """End the process group a launched run formed (torch warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AgreedFlag:
    """A flag every process agrees on, without making the host wait for the GPU each step.

    ``agreed = flag(local)`` at every step boundary, on every process: with one process it is
    ``local``. With several, the flags are combined (any) by an all-reduce; on CUDA its result
    is read one boundary later, when the GPU is long past it, so asking every step costs no
    wait (:func:`any_process` waits for the GPU to get there). Every process sees the same
    answers at the same boundaries, so all stop at the same step.
    """

    def __init__(self, device: torch.device, world: int) -> None:
        self.device, self.world = torch.device(device), world
        self._earlier: tuple[torch.Tensor, "torch.cuda.Event"] | None = None

    def __call__(self, local: bool) -> bool:
        if self.world <= 1:
            return local
        import torch.distributed as dist

        vote = torch.tensor([1.0 if local else 0.0])
        if self.device.type != "cuda":
            dist.all_reduce(vote, op=dist.ReduceOp.MAX)
            return bool(vote.item())
        on_device = vote.pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
        host = torch.empty(1, pin_memory=True)
        host.copy_(on_device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        earlier, self._earlier = self._earlier, (host, done)
        if earlier is None:
            return False
        earlier[1].synchronize()
        return bool(earlier[0].item())
