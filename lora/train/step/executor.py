"""How one optimizer step's GPU work runs: the interface every implementation has, and the plain one.

A step executor gets one optimizer step's micro-batches (already on the device, this
process's share) and the divisor of the step's mean loss, and runs forward, backward, the
gradient all-reduce of several processes, clipping and the optimizer update. It returns a
:class:`PendingStep` without waiting for the GPU. Two implementations:

- :class:`PlainExecutor` (here): eager PyTorch, the reference every other path must match;
- ``GraphedExecutor`` (lora/train/step/graphed.py): the same step replayed from CUDA graphs.

What is the same for every implementation stays outside it: the seeded draws and staging
(lora/train/step/inputs.py), the loss function (lora/train/step/loss.py, handed in), and in
``StepRunner`` (lora/train/step/runner.py) the learning-rate schedule and the fall-back from a
failing fast path. So a change of how the graphed path prepares or replays its graphs stays
inside that class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .inputs import MicroInputs

if TYPE_CHECKING:  # pragma: no cover
    from lora.train.distributed import GradientSync

#: ``loss_fn(latents, noise, timesteps, text, n_total[, sample_weight])``: a micro-batch's share
#: of the step's mean loss (summed over its images, divided by ``n_total``, the step's image
#: count; ``sample_weight`` 1 per image and 0 per padding row where a batch is padded)
LossFn = Callable[..., torch.Tensor]


class PendingStep:
    """A queued step's loss sum and gradient norm, copied to the host as soon as the GPU gets there.

    Why: reading a loss makes the host wait for the GPU. The copy into page-locked memory is
    queued right behind the step, so :meth:`values` waits for *this* step only, even when the
    next step has been queued since (the loop reads step n while step n+1 runs).
    """

    def __init__(self, host: torch.Tensor, done: "torch.cuda.Event | None") -> None:
        self._host, self._done = host, done

    @classmethod
    def of(cls, loss_sum: torch.Tensor, grad_norm: torch.Tensor | float) -> "PendingStep":
        norm = grad_norm if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
        norm = norm.detach().float().reshape(()).to(loss_sum.device)
        both = torch.stack([loss_sum.detach().float().reshape(()), norm])
        if both.device.type != "cuda":
            return cls(both, None)
        host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        host.copy_(both, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def values(self) -> tuple[float, float]:
        """(loss sum, gradient norm); waits for the step's GPU work if it has not finished."""
        if self._done is not None:
            self._done.synchronize()
        loss, norm = self._host.tolist()
        return loss, norm


@dataclass
class WarmupRecord:
    """Something an executor prepared once for a shape (compile, capture), and what it took."""

    shape: tuple[int, ...]
    seconds: float
    #: the eager calls before a capture, each on its own (the first one loads and picks kernels)
    eager_s: tuple[float, ...] = ()
    #: the capture itself
    capture_s: float | None = None

    def as_record(self) -> dict:
        out: dict = {"shape": list(self.shape), "seconds": round(self.seconds, 3)}
        if self.eager_s:
            out["eager_s"] = [round(s, 3) for s in self.eager_s]
        if self.capture_s is not None:
            out["capture_s"] = round(self.capture_s, 3)
        return out


class StepExecutor:
    """Runs one optimizer step's GPU work; see the module docstring."""

    #: what was prepared per input shape so far (the benchmark reports it)
    warmups: list[WarmupRecord]

    def queue(self, micro_inputs: list[MicroInputs], n_total: int, rows: int | None = None) -> PendingStep:
        """Queue forward + backward of every micro-batch, the gradient sum over processes,
        clipping and the optimizer update; the gradients are zero again afterwards. Returns
        without waiting for the GPU. ``micro_inputs`` may be empty (a process without an
        image in this step still takes part in the all-reduce). ``rows``: the images of a full
        micro-batch on this process (an implementation may pad smaller ones to it)."""
        raise NotImplementedError

    def forward_changed(self) -> None:
        """The UNet forward the loss calls was replaced (compile turned off): drop anything
        prepared for the old one."""

    def loss_scale_state(self) -> dict[str, Any] | None:
        """fp16's dynamic loss scale, in ``torch.amp.GradScaler.state_dict()``'s keys
        (``scale``, ``_growth_tracker``), for a checkpoint; None without one (bf16, fp32).

        Why: without it every resumed segment starts again at 2**16 and backs off through
        skipped (overflowing) steps that the uninterrupted run did not skip."""
        return None

    def load_loss_scale_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's loss scale (either executor's format: the same keys)."""


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, foreach=grads[0].is_cuda)
    return torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads]))


class PlainExecutor(StepExecutor):
    """The eager step: each micro-batch's forward and backward, then clip and optimizer step."""

    def __init__(self, loss_fn: LossFn, accelerator, optimizer, params: list[torch.nn.Parameter],
                 max_grad_norm: float | None, sync: "GradientSync | None") -> None:
        self.loss_fn, self.accelerator, self.optimizer = loss_fn, accelerator, optimizer
        self.params, self.max_grad_norm, self.sync = params, max_grad_norm, sync
        self.device = accelerator.device
        self.warmups = []

    def queue(self, micro_inputs: list[MicroInputs], n_total: int, rows: int | None = None) -> PendingStep:
        self.zero_grads()
        losses = []
        for lat, noise, t, ehs in micro_inputs:
            loss = self.loss_fn(lat, noise, t, ehs, n_total)
            self.accelerator.backward(loss)
            losses.append(loss.detach())
        loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        if self.sync is not None:  # every process now holds the whole step's gradients and loss
            loss_sum = self.sync.sum_(loss_sum)
        if self.max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        else:  # the norm is still logged; foreach kernels keep it cheap for hundreds of tensors
            self.accelerator.unscale_gradients()
            grad_norm = total_norm([p.grad for p in self.params if p.grad is not None])
        pending = PendingStep.of(loss_sum, grad_norm)  # before the optimizer changes anything
        self.optimizer.step()
        self.zero_grads()
        return pending

    def _scaler(self):
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def loss_scale_state(self) -> dict[str, Any] | None:
        scaler = self._scaler()
        if scaler is None:
            return None
        state = scaler.state_dict()
        return {"scale": float(state["scale"]), "_growth_tracker": int(state["_growth_tracker"])}

    def load_loss_scale_state(self, state: dict[str, Any]) -> None:
        scaler = self._scaler()
        if scaler is not None:
            scaler.load_state_dict({**scaler.state_dict(), **state})

    def zero_grads(self) -> None:
        if self.sync is not None:
            self.sync.zero_()  # keep the gradients as views of the all-reduce buffer
        else:
            self.optimizer.zero_grad(set_to_none=True)
