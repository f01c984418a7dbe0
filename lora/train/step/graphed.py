"""A training step replayed from CUDA graphs: the fast implementation of the step executor.

The whole step is captured, one graph per micro-batch shape (bucket): the noise mixing, the
UNet, the loss and its backward in one graph, and gradient norm, clipping, the (fused,
capturable) AdamW update and the zeroing of the gradients in a second one. A step is then a few
host-to-device copies of the step's draws and two graph replays. Warm-up runs before a capture
are undone (parameters and optimizer state restored), so capturing changes no weights; the
loss function and the draws are the plain path's (lora/train/step/executor.py), so what is
trained is the same.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .executor import LossFn, MicroInputs, PendingStep, StepExecutor, WarmupRecord

if TYPE_CHECKING:  # pragma: no cover
    from lora.train.distributed import GradientSync

log = logging.getLogger(__name__)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with its first row repeated up to ``rows`` rows (finite values for weight-0 slots)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


@dataclass
class _MicroGraph:
    graph: torch.cuda.CUDAGraph
    lat: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    ehs: torch.Tensor
    weight: torch.Tensor  # 1 for each image of the micro-batch, 0 for the padding after them
    loss: torch.Tensor   # static output, read right after each replay


class _LossScale:
    """fp16's dynamic loss scale as device tensors, so scaling, the overflow check, the skipped
    update and the scale's growth/back-off all run inside the CUDA graphs (no host sync).

    The same rule as ``torch.amp.GradScaler`` (start 2**16, x2 after 2000 good steps, x0.5 on
    an overflow, whose update is skipped): fused AdamW takes ``found_inf`` and leaves the
    weights, moments and step count alone when it is set."""

    def __init__(self, device: torch.device) -> None:
        self.scale = torch.full((), 2.0 ** 16, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def unscale(self, grads: list[torch.Tensor]) -> None:
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)

    def state_dict(self) -> dict[str, Any]:
        """``GradScaler.state_dict()``'s keys, so either path resumes the other's checkpoint."""
        return {"scale": float(self.scale.item()), "_growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place: the captured graphs read these very tensors."""
        self.scale.fill_(float(state["scale"]))
        self.growth_tracker.fill_(int(state["_growth_tracker"]))


class GraphedExecutor(StepExecutor):
    """A step replayed from CUDA graphs: a micro-batch graph per input shape and one optimizer graph.

    All graphs share one memory pool. That is safe because they are replayed one at a time on
    one stream and each graph's outputs (the loss and the gradient norm) are copied out right
    after its replay; gradients, optimizer state and inputs live outside the pool.

    A captured optimizer update reads its learning rate from device memory, so the first
    capture turns each param group's ``lr`` into a device tensor that the lr scheduler fills in
    place; ``state_dict()`` / ``load_state_dict()`` keep the plain path's float format, so
    checkpoints do not depend on the path that wrote them.
    """

    def __init__(self, loss_fn: LossFn, optimizer, params: list[torch.nn.Parameter], device: torch.device,
                 max_grad_norm: float | None, sync: "GradientSync | None" = None, *,
                 latent_shapes: Sequence[tuple[int, ...]] = (), num_train_timesteps: int = 1000,
                 fp16: bool = False, pad_batches: bool = True) -> None:
        self.loss_fn, self.optimizer, self.params = loss_fn, optimizer, params
        self.device, self.max_grad_norm, self.sync = device, max_grad_norm, sync
        #: every latent shape the run trains on (its buckets): all captured before the first step
        self.latent_shapes = sorted(set(map(tuple, latent_shapes)), key=lambda shape: (-math.prod(shape), shape))
        self.num_train_timesteps, self.pad_batches = num_train_timesteps, pad_batches
        #: fp16 only: the loss scale kept on the device
        self.loss_scale = _LossScale(device) if fp16 else None
        #: the step's image count (the loss divisor), a device input of every micro-batch graph
        self.n_total: torch.Tensor | None = None
        #: device 0/1 weight vectors by (rows, images), copied into a graph's weight input
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self.pool: Any = None
        self.micro: dict[tuple, _MicroGraph] = {}
        self.opt_graph: torch.cuda.CUDAGraph | None = None
        self.grad_norm: torch.Tensor | None = None
        self.grads: list[torch.Tensor] = []
        self.warmups: list[WarmupRecord] = []
        self.lr_tensors: list[torch.Tensor] = []

    @property
    def _base_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper

    # -- optimizer in a graph --------------------------------------------------------------

    def _tensor_lrs(self) -> None:
        """Give each param group a device ``lr`` tensor (the scheduler ``fill_``s it in place),
        and keep ``state_dict()`` / ``load_state_dict()`` in the plain path's float format."""
        base = self._base_optimizer
        self.lr_tensors = []
        for group in base.param_groups:
            lr = group["lr"]
            value = float(lr) if not torch.is_tensor(lr) else float(lr.item())
            tensor = torch.tensor(value, dtype=torch.float32, device=self.device)
            group["lr"] = tensor
            group["capturable"] = True
            self.lr_tensors.append(tensor)

        def to_floats(_opt, state: dict) -> dict:
            for g in state["param_groups"]:
                if torch.is_tensor(g.get("lr")):
                    g["lr"] = float(g["lr"].item())
                g["capturable"] = False
            return state

        def back_to_tensors(_opt) -> None:
            for group, tensor in zip(base.param_groups, self.lr_tensors):
                value = group["lr"]
                tensor.fill_(float(value.item()) if torch.is_tensor(value) else float(value))
                group["lr"] = tensor
                group["capturable"] = True
            self.forward_changed()  # load_state_dict replaced the state tensors the graph points at

        base.register_state_dict_post_hook(to_floats)
        base.register_load_state_dict_post_hook(back_to_tensors)

    def forward_changed(self) -> None:
        """Drop every graph; the next step captures again."""
        self.micro.clear()
        self.opt_graph = None

    def loss_scale_state(self) -> dict[str, Any] | None:
        return None if self.loss_scale is None else self.loss_scale.state_dict()

    def load_loss_scale_state(self, state: dict[str, Any]) -> None:
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state)

    def _optimizer_tail(self) -> torch.Tensor:
        """Gradient norm, clipping, AdamW and zeroed gradients: what the optimizer graph runs."""
        optimizer = self.optimizer
        if self.loss_scale is not None:
            self.loss_scale.unscale(self.grads)
            # accelerate's wrapper would step its own (host-synchronising) scaler: go around it;
            # fused AdamW skips the whole update where found_inf is set
            optimizer = self._base_optimizer
            optimizer.found_inf = self.loss_scale.found_inf
            optimizer.grad_scale = None
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(self.grads, foreach=True)
        optimizer.step()
        if self.loss_scale is not None:
            self.loss_scale.update()
        torch._foreach_zero_(self.grads)
        return norm

    # -- capture ---------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        base = self._base_optimizer
        params = [p.detach().clone() for p in self.params]
        states = {id(p): {k: v.clone() for k, v in base.state[p].items() if torch.is_tensor(v)}
                  for p in self.params if p in base.state}
        scale = None
        if self.loss_scale is not None:
            scale = (self.loss_scale.scale.clone(), self.loss_scale.growth_tracker.clone())
        return params, states, scale

    def _restore(self, snap) -> None:
        """Undo the warm-up's optimizer step in place (the graph keeps these very tensors)."""
        params, states, scale = snap
        base = self._base_optimizer
        if scale is not None and self.loss_scale is not None:
            self.loss_scale.scale.copy_(scale[0])
            self.loss_scale.growth_tracker.copy_(scale[1])
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
            for p in self.params:
                st = base.state.get(p, {})
                saved_state = states.get(id(p))
                for k, v in st.items():
                    if not torch.is_tensor(v):
                        continue
                    if saved_state is not None and k in saved_state:
                        v.copy_(saved_state[k])
                    else:  # fresh AdamW state: step 0, zero moments
                        v.zero_()
            torch._foreach_zero_(self.grads)

    def _ensure_grads(self) -> None:
        """Gradients exist before any capture, so every graph accumulates into these tensors."""
        if self.grads:
            if self.params[0].grad is not self.grads[0]:  # the plain path or an OOM retry ran
                for p, g in zip(self.params, self.grads):
                    p.grad = g
                torch._foreach_zero_(self.grads)  # a step starts from zero; drop a failed attempt's sums
            return
        for p in self.params:
            if p.grad is None or p.grad.data_ptr() == 0:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        self.grads = [p.grad for p in self.params]

    def _static(self, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> _MicroGraph:
        """The fixed input/output buffers a micro-batch graph reads and writes."""
        if self.n_total is None:
            self.n_total = torch.full((), float(lat.shape[0]), device=self.device)
        return _MicroGraph(torch.cuda.CUDAGraph(), lat.clone(), noise.clone(), t.clone(), ehs.clone(),
                           torch.ones(lat.shape[0], device=self.device), torch.zeros((), device=self.device))

    def _micro(self, static: _MicroGraph) -> torch.Tensor:
        """One micro-batch's forward and backward on ``static``'s buffers (what a graph records)."""
        loss = self.loss_fn(static.lat, static.noise, static.t, static.ehs, self.n_total, static.weight)
        scale = self.loss_scale
        (loss * scale.scale if scale is not None else loss).backward()
        return loss.detach()

    def _capture_shapes(self, shapes: list[tuple[tuple, MicroInputs]]) -> None:
        """Warm up, then capture, a graph for each ``(key, example inputs)``, in that order.

        Every shape is warmed up (compile, cuBLAS/cuDNN handles and algorithm choice) before
        any is captured, and the warm-up's cached blocks go back to the card in between: the
        eager warm-up and the graph pool never hold memory at the same time."""
        started = time.perf_counter()
        if self.opt_graph is None and not self.lr_tensors:
            self._tensor_lrs()
        self._ensure_grads()
        # the scheduler's state is untouched: only params, grads and optimizer state can change
        snap = self._snapshot()
        statics = [(key, self._static(*inputs)) for key, inputs in shapes]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            eager: list[tuple[float, ...]] = []
            with torch.cuda.stream(side):
                for _key, static in statics:
                    calls = []
                    for _ in range(2):  # compile (first call), handles, cuDNN's algorithm choice
                        t0 = time.perf_counter()
                        self._micro(static)
                        side.synchronize()  # each call's own time: the first is the costly one
                        calls.append(time.perf_counter() - t0)
                    eager.append(tuple(calls))
                self._optimizer_tail()  # creates the optimizer state outside the graph pool
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self._restore(snap)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's blocks; the graphs take theirs from the pool
            warmed = time.perf_counter()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            share = (warmed - started - sum(map(sum, eager))) / len(statics)  # the rest, split evenly
            for (key, static), calls in zip(statics, eager):
                t0 = time.perf_counter()
                with torch.cuda.graph(static.graph, pool=self.pool):
                    static.loss = self._micro(static)
                if self.opt_graph is None:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool):
                        self.grad_norm = self._optimizer_tail()
                    self.opt_graph = g
                self.micro[key] = static
                capture = time.perf_counter() - t0
                self.warmups.append(WarmupRecord(tuple(key[0]), share + sum(calls) + capture, calls, capture))
            torch.cuda.synchronize()
        except BaseException:
            torch.cuda.synchronize()
            for key, _static in statics:
                self.micro.pop(key, None)
            self._restore(snap)  # a failed warm-up or capture must not leave a half step behind
            raise
        # capturing ran nothing, but be exact: grads zero, params and state as they were
        self._restore(snap)
        torch.cuda.synchronize()
        log.info("CUDA graphs for micro-batch shape(s) %s ready in %.1f s (warm-up %.1f s)",
                 ", ".join(str(tuple(key[0])) for key, _ in statics), time.perf_counter() - started,
                 warmed - started)

    def _capture_all(self, rows: int, example: MicroInputs) -> None:
        """Capture every bucket's graph before the first step, the largest shape first.

        Why up front and in that order: all graphs share one memory pool, and the pool reuses
        a free block only for a request that fits in it. Captured largest first, each later
        (smaller) graph mostly fits in the blocks the ones before it freed, instead of the pool
        growing with every larger shape that the data happens to bring later."""
        lat0, _noise0, t0, ehs0 = example
        g = torch.Generator(device=lat0.device).manual_seed(0)  # leaves the training RNGs alone
        shapes = []
        for shape in self.latent_shapes:
            key = ((rows, *shape), (rows, *ehs0.shape[1:]))
            if key in self.micro:
                continue
            lat = torch.randn((rows, *shape), generator=g, device=lat0.device, dtype=lat0.dtype)
            noise = torch.randn((rows, *shape), generator=g, device=lat0.device, dtype=lat0.dtype)
            t = torch.randint(0, self.num_train_timesteps, (rows,), generator=g, device=t0.device, dtype=t0.dtype)
            ehs = torch.randn((rows, *ehs0.shape[1:]), generator=g, device=ehs0.device, dtype=ehs0.dtype)
            shapes.append((key, (lat, noise, t, ehs)))
        if shapes:
            self._capture_shapes(shapes)

    def _weight(self, rows: int, images: int) -> torch.Tensor:
        w = self._weights.get((rows, images))
        if w is None:
            w = torch.zeros(rows, device=self.device)
            w[:images] = 1.0
            self._weights[(rows, images)] = w
        return w

    # -- one step --------------------------------------------------------------------------

    def queue(self, micro_inputs: list[MicroInputs], n_total: int, rows: int | None = None) -> PendingStep:
        """Replays the graphs for a step's micro-batches (capturing a new shape first).

        ``rows``: the images of a full micro-batch on this process. A smaller (partial)
        micro-batch runs in its bucket's full graph with the missing rows weighted 0: the same
        images and the same loss (the sum over the step's images over ``n_total``), and no
        graph, warm-up or memory per partial size.

        With several processes, gradients and loss are summed between the micro-batch graphs
        and the optimizer graph, so the optimizer graph sees the whole step's gradients."""
        total = None
        self._ensure_grads()
        pad = rows if (rows and self.pad_batches) else None
        if pad and not self.micro and micro_inputs:
            self._capture_all(pad, micro_inputs[0])
        if self.n_total is not None:
            self.n_total.fill_(float(n_total))
        for lat, noise, t, ehs in micro_inputs:
            n = lat.shape[0]
            size = pad if pad and n <= pad else n
            key = ((size, *lat.shape[1:]), (size, *ehs.shape[1:]))
            g = self.micro.get(key)
            if g is None:  # a shape not seen before (a smaller micro-batch after out of memory)
                self._capture_shapes([(key, tuple(_pad_rows(x, size) for x in (lat, noise, t, ehs)))])
                g = self.micro[key]
                self.n_total.fill_(float(n_total))
            g.lat[:n].copy_(lat, non_blocking=True)
            g.noise[:n].copy_(noise, non_blocking=True)
            g.t[:n].copy_(t, non_blocking=True)
            g.ehs[:n].copy_(ehs, non_blocking=True)
            g.weight.copy_(self._weight(size, n))
            g.graph.replay()
            total = g.loss.clone() if total is None else total + g.loss
        if total is None:  # this process had no image in this step (fewer images than processes)
            total = torch.zeros((), device=self.device)
        if self.sync is not None:
            total = self.sync.sum_(total)
        if self.opt_graph is None:  # nothing captured yet on this process: run the tail eagerly
            if not self.lr_tensors:
                self._tensor_lrs()
            return PendingStep.of(total, self._optimizer_tail().detach().clone())
        assert self.grad_norm is not None
        self.opt_graph.replay()
        return PendingStep.of(total, self.grad_norm.clone())
