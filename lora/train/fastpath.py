"""The CUDA fast path of a training step: channels-last, ``torch.compile`` and CUDA graphs.

Why: at the phase2a settings (batch 4, 512 px) a step on an H200 is bound by kernel *launches*,
not arithmetic: the UNet's ~2,000 small kernels plus the loss, gradient norm and optimizer
kernels each cost CPU time. The fast path

- compiles the UNet forward/backward (``torch.compile``, default mode: fused elementwise
  kernels, no autotuning so the warm-up stays around a minute);
- captures the *whole* step in CUDA graphs, one per micro-batch shape (bucket): the noise
  mixing, the UNet, the loss and its backward in one graph, and gradient norm, clipping, the
  (fused, capturable) AdamW update and the zeroing of the gradients in a second one. A step is
  then a few host-to-device copies of the step's draws and two graph replays;
- keeps what is trained the same: the same seeded draws (made on the host exactly as in the
  plain path), the same loss function (``StepRunner.micro_loss``, lora/train/step.py), the same optimizer
  object and state, so checkpoints are interchangeable with the plain path. Warm-up runs
  before a capture are undone (parameters and optimizer state restored), so capturing changes
  no weights.

Every part is a switch in :class:`~lora.config.TrainConfig` (``compile``, ``cuda_graphs``,
``channels_last``, ``cudnn_benchmark``, ``fused_qkv``, ``overlap_steps``,
``compiled_channels_last``: ``auto`` = on for CUDA only; ``attention`` picks the
SDPA kernel; ``low_memory`` turns compile and graphs off by default). Where graphs cannot be
used (LoRA dropout, a trained text encoder, fp16) the step falls back to the plain path,
compiled when ``compile`` is on. Several processes keep the graphs: the gradient all-reduce
runs between the micro-batch graphs and the optimizer graph (lora/train/distributed.py).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from lora.config import ConfigError, TrainConfig

from .executor import LossFn, MicroInputs, PendingStep, StepExecutor, WarmupRecord

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import GradientSync

log = logging.getLogger(__name__)

#: torch.compile backend of the fast path. Tests on CPU swap in "aot_eager" (same tracing and
#: autograd split, no C++/Triton code generation).
COMPILE_BACKEND = "inductor"


#: inductor options of the UNet's compile with ``compiled_channels_last`` (bench/blocks.py uses
#: them too, so the blocks it times are compiled as the trainer compiles them)
COMPILED_CHANNELS_LAST_OPTIONS = {"force_layout_optimization": True}


#: What ``attention=auto`` picks on a CUDA device (measured: bench/README.md).
AUTO_CUDA_ATTENTION = "default"


@dataclass(frozen=True)
class FastOptions:
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    #: scaled-dot-product attention kernel preferred in the training forward ("default": PyTorch's)
    attention: str = "default"
    #: let cuDNN time its convolution algorithms per shape (process-wide setting)
    cudnn_benchmark: bool = False
    #: one matrix product for each attention layer's q/k/v (and cross-attention k/v), LoRA included
    fused_qkv: bool = False
    #: the loop queues step n+1 before it reads step n's loss (lora/train/loop.py)
    overlap_steps: bool = False
    #: inductor keeps the compiled UNet's activations channels-last (its layout optimisation)
    compiled_channels_last: bool = False

    def without(self, **changes: bool) -> "FastOptions":
        """A copy with some switches changed (the step's fall-back turns parts off)."""
        return replace(self, **changes)


def _switch(value: str, name: str, default: bool) -> bool:
    if value == "auto":
        return default
    if value in ("on", "off"):
        return value == "on"
    raise ConfigError(f"invalid training config: {name}: expected auto, on or off, got {value!r}")


def resolve_fast_options(cfg: TrainConfig, device: torch.device | str, num_processes: int = 1,
                         mixed_precision: str = "bf16") -> FastOptions:
    """``auto`` means on for a CUDA device, off elsewhere (CPU keeps the bit-exact plain path).

    CUDA graphs are off (``auto``) or refused (``on``) where they would change what is trained
    or cannot be captured: no CUDA device, LoRA dropout (its random mask), a trained text
    encoder (its backward runs outside the UNet) and fp16's loss scaler. Several processes keep
    them: the gradient all-reduce runs between the graphs (lora/train/distributed.py).
    """
    cuda = torch.device(device).type == "cuda"
    # low_memory: the compiled kernels' and graphs' pools cost ~0.5-1 GiB more than they save
    compile_on = _switch(cfg.compile, "compile", cuda and not cfg.low_memory)
    channels_last = _switch(cfg.channels_last, "channels_last", cuda)
    cudnn_benchmark = _switch(cfg.cudnn_benchmark, "cudnn_benchmark", cuda)
    # LoRA dropout draws a mask per projection: the fused product cannot share one input
    fused_qkv = _switch(cfg.fused_qkv, "fused_qkv", cuda and cfg.lora_dropout == 0)
    if fused_qkv and cfg.lora_dropout > 0:
        raise ConfigError("invalid training config: fused_qkv: on is not possible with lora_dropout > 0 "
                          "(each projection draws its own dropout mask)")
    overlap_steps = _switch(cfg.overlap_steps, "overlap_steps", cuda)
    compiled_cl = _switch(cfg.compiled_channels_last, "compiled_channels_last", cuda and compile_on)
    if compiled_cl and not compile_on:
        raise ConfigError("invalid training config: compiled_channels_last: on needs compile (it is a "
                          "layout choice of the compiled UNet); compile is off here")
    attention = cfg.attention if cfg.attention != "auto" else (AUTO_CUDA_ATTENTION if cuda else "default")
    blockers = []
    if not cuda:
        blockers.append("needs a CUDA device")
    if cfg.lora_dropout > 0:
        blockers.append("lora_dropout > 0 draws a random mask each step")
    if cfg.train_text_encoder:
        blockers.append("train_text_encoder runs the text encoder's backward outside the graph")
    if mixed_precision == "fp16":
        blockers.append("fp16 uses a dynamic loss scaler that skips steps")
    graphs = _switch(cfg.cuda_graphs, "cuda_graphs", not blockers and not cfg.low_memory)
    if graphs and blockers:
        raise ConfigError(f"invalid training config: cuda_graphs: on is not possible here: {'; '.join(blockers)}")
    return FastOptions(compile=compile_on, cuda_graphs=graphs, channels_last=channels_last,
                       attention=attention, cudnn_benchmark=cudnn_benchmark, fused_qkv=fused_qkv,
                       overlap_steps=overlap_steps, compiled_channels_last=compiled_cl)


_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}


def attention_context(name: str) -> contextlib.AbstractContextManager:
    """Prefer one SDPA kernel for the forward it wraps; the others stay as fall-backs for shapes
    it does not support. ``torch.compile`` bakes the kernel chosen at trace time into its graph,
    so wrapping the compiled call is enough."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, _BACKENDS[name])
    order = [first] + [getattr(SDPBackend, b) for b in _BACKENDS.values() if getattr(SDPBackend, b) != first]
    return sdpa_kernel(order, set_priority=True)


def use_expandable_segments() -> bool:
    """Let the CUDA caching allocator grow segments instead of caching fixed blocks, so the
    memory held stays close to the memory in use (takes effect for new allocations). True if set."""
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None or not torch.cuda.is_available():
        return False
    try:
        setter("expandable_segments:True")
    except (RuntimeError, ValueError) as exc:  # an allocator that does not support it
        log.warning("could not enable expandable CUDA memory segments: %s", exc)
        return False
    return True


def _raise_recompile_limit(limit: int = 64) -> None:
    """One compiled graph per bucket shape: lift dynamo's default of 8 recompiles."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def prepare_forward(unet: torch.nn.Module, opts: FastOptions) -> Callable[..., Any]:
    """The callable a step uses for the UNet forward: the module, channels-last and/or compiled."""
    if opts.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # process-wide; off by default, never turned off here
    if opts.channels_last:
        unet.to(memory_format=torch.channels_last)
    if opts.fused_qkv:
        from .fused_qkv import install_fused_qkv

        fused = install_fused_qkv(unet)
        log.info("fused q/k/v projections in %d attention layers", fused)
    if not opts.compile:
        return unet
    _raise_recompile_limit()
    options = None
    if opts.compiled_channels_last and COMPILE_BACKEND == "inductor":
        # Inductor skips its channels-last layout for graphs with convolutions whose output has
        # at most half the input channels (the UNet's skip concatenations); without it each
        # convolution and its backward copies activations between layouts (bench/README.md).
        options = dict(COMPILED_CHANNELS_LAST_OPTIONS)
    return torch.compile(unet, dynamic=False, backend=COMPILE_BACKEND, options=options)


# --------------------------------------------------------------------------------------------
# CUDA graphs


@dataclass
class _MicroGraph:
    graph: torch.cuda.CUDAGraph
    lat: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    ehs: torch.Tensor
    loss: torch.Tensor   # static output, read right after each replay


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
                 max_grad_norm: float | None, sync: "GradientSync | None" = None) -> None:
        self.loss_fn, self.optimizer, self.params = loss_fn, optimizer, params
        self.device, self.max_grad_norm, self.sync = device, max_grad_norm, sync
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

    def _optimizer_tail(self) -> torch.Tensor:
        """Gradient norm, clipping, AdamW and zeroed gradients: what the optimizer graph runs."""
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(self.grads, foreach=True)
        self.optimizer.step()
        torch._foreach_zero_(self.grads)
        return norm

    # -- capture ---------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        base = self._base_optimizer
        params = [p.detach().clone() for p in self.params]
        states = {id(p): {k: v.clone() for k, v in base.state[p].items() if torch.is_tensor(v)}
                  for p in self.params if p in base.state}
        return params, states

    def _restore(self, snap) -> None:
        """Undo the warm-up's optimizer step in place (the graph keeps these very tensors)."""
        params, states = snap
        base = self._base_optimizer
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

    def _capture(self, key: tuple, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                 ehs: torch.Tensor, n_total: int) -> _MicroGraph:
        t0 = time.perf_counter()
        if self.opt_graph is None and not self.lr_tensors:
            self._tensor_lrs()
        self._ensure_grads()
        # the scheduler's state is untouched: only params, grads and optimizer state can change
        snap = self._snapshot()
        static = _MicroGraph(torch.cuda.CUDAGraph(), lat.clone(), noise.clone(), t.clone(), ehs.clone(),
                             torch.zeros((), device=self.device))

        def micro() -> torch.Tensor:
            loss = self.loss_fn(static.lat, static.noise, static.t, static.ehs, n_total)
            loss.backward()
            return loss.detach()

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # compile (first call), cuBLAS/cuDNN handles, autotune caches
                    micro()
                self._optimizer_tail()  # creates the optimizer state outside the graph pool
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self._restore(snap)
            torch.cuda.synchronize()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(static.graph, pool=self.pool):
                out = micro()
            static.loss = out
            if self.opt_graph is None:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    self.grad_norm = self._optimizer_tail()
                self.opt_graph = g
            torch.cuda.synchronize()
        except BaseException:
            torch.cuda.synchronize()
            self._restore(snap)  # a failed warm-up or capture must not leave a half step behind
            raise
        # capturing ran nothing, but be exact: grads zero, params and state as they were
        self._restore(snap)
        torch.cuda.synchronize()
        self.micro[key] = static
        torch.cuda.empty_cache()  # hand back the warm-up's cached blocks; the graph pool stays
        self.warmups.append(WarmupRecord(tuple(key[0]), time.perf_counter() - t0))
        log.info("captured CUDA graphs for micro-batch shape %s in %.1f s", tuple(key[0]), time.perf_counter() - t0)
        return static

    # -- one step --------------------------------------------------------------------------

    def queue(self, micro_inputs: list[MicroInputs], n_total: int) -> PendingStep:
        """Replays the graphs for a step's micro-batches (capturing a new shape first).

        With several processes, gradients and loss are summed between the micro-batch graphs
        and the optimizer graph, so the optimizer graph sees the whole step's gradients."""
        total = None
        self._ensure_grads()
        for lat, noise, t, ehs in micro_inputs:
            key = (tuple(lat.shape), tuple(ehs.shape), n_total)
            g = self.micro.get(key)
            if g is None:
                g = self._capture(key, lat, noise, t, ehs, n_total)
            g.lat.copy_(lat, non_blocking=True)
            g.noise.copy_(noise, non_blocking=True)
            g.t.copy_(t, non_blocking=True)
            g.ehs.copy_(ehs, non_blocking=True)
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
