"""The speed options a run trains with: what ``TrainConfig.speed`` asks for, decided for this device.

Why: at the phase2a settings (batch 4, 512 px) a step on an H200 is bound by kernel *launches*,
not arithmetic: the UNet's ~2,000 small kernels plus the loss, gradient norm and optimizer
kernels each cost CPU time. The fast path

- compiles the UNet forward/backward (``torch.compile``, default mode: fused elementwise
  kernels, no autotuning so the warm-up stays around a minute): lora/train/speed/compile.py;
- captures the *whole* step in CUDA graphs, one per micro-batch shape (bucket):
  lora/train/step/graphed.py;
- keeps what is trained the same: the same seeded draws, the same loss function
  (lora/train/step/loss.py), the same optimizer object and state, so checkpoints are
  interchangeable with the plain path.

Every part is a switch in :class:`~lora.config.SpeedOptions` (``compile``, ``cuda_graphs``,
``channels_last``, ``cudnn_benchmark``, ``fused_qkv``, ``overlap_steps``,
``compiled_channels_last``, ``half_norms``: ``auto`` = on for CUDA only; ``attention`` picks the
SDPA kernel; ``low_memory`` turns compile off by default). Where graphs cannot be used (LoRA
dropout, a trained text encoder) the step falls back to the plain path, compiled when
``compile`` is on. Several processes keep the graphs: the gradient all-reduce runs between the
micro-batch graphs and the optimizer graph (lora/train/distributed.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lora.config import ConfigError, TrainConfig

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
    #: the loop queues step n+1 before it reads step n's loss (lora/train/run/loop.py)
    overlap_steps: bool = False
    #: inductor keeps the compiled UNet's activations channels-last (its layout optimisation)
    compiled_channels_last: bool = False
    #: compile the UNet's repeated blocks one by one with dynamic height/width (one compile for
    #: every bucket shape) instead of the whole UNet once per shape
    compile_blocks: bool = False
    #: CUDA graphs: a partial batch (the end of a bucket) runs in its bucket's full-batch graph
    #: with the missing images weighted 0, so it adds no graph (and no warm-up, no memory)
    pad_batches: bool = True
    #: the UNet's norms keep bf16/fp16 activations under autocast (lora/train/speed/half_norms.py)
    half_norms: bool = False

    def without(self, **changes: bool) -> "FastOptions":
        """A copy with some switches changed (the step's fall-back turns parts off)."""
        return replace(self, **changes)


def _switch(value: str, name: str, default: bool) -> bool:
    if value == "auto":
        return default
    if value in ("on", "off"):
        return value == "on"
    raise ConfigError(f"invalid training config: {name}: expected auto, on or off, got {value!r}")


#: ``compile=auto`` compiles the UNet only for a run of at least this many optimizer steps per
#: bucket shape. Measured on an H200 at phase2a (bench/README.md, "many buckets" and "half
#: norms"): a compile costs 125-150 s per shape and saves ~13 ms a step (132 against 91.5
#: images/s for graphs with half-precision norms), so it pays for itself after ~11,000 steps of
#: each shape; the guide's 20-epoch run has 3,000 in all.
COMPILE_MIN_STEPS_PER_SHAPE = 11000
#: ``cudnn_benchmark=auto`` lets cuDNN time its convolution algorithms only for a run of at
#: least this many optimizer steps per bucket shape. Measured on an H100 at phase2a (bench/README.md,
#: "eleventh session"): the timing made each shape's first eager call 1.6 s longer (graph
#: warm-up of 5 shapes 15.0 s against 7.0 s) and its choice saved ~0.6 ms a step (88.5 against
#: 87.4 images/s, medians), so it pays for itself after ~2,750 steps of each shape; the guide's
#: 20-epoch run has ~590.
CUDNN_BENCHMARK_MIN_STEPS_PER_SHAPE = 2750


def _pays_back(total_steps: int | None, shapes: int, steps_per_shape: int) -> bool:
    """Whether a run has ``steps_per_shape`` steps for each bucket shape: where a once-per-shape
    cost (a compile, cuDNN's timing) pays for itself. Unknown ``total_steps``: yes."""
    return total_steps is None or total_steps >= steps_per_shape * max(1, shapes)


def resolve_fast_options(cfg: TrainConfig, device: torch.device | str, num_processes: int = 1,
                         mixed_precision: str = "bf16", total_steps: int | None = None,
                         shapes: int = 1) -> FastOptions:
    """``auto`` means on for a CUDA device, off elsewhere (CPU keeps the bit-exact plain path).

    ``compile=auto`` is decided by the run: on only when its steps per bucket shape
    (``total_steps / shapes``) reach :data:`COMPILE_MIN_STEPS_PER_SHAPE`, where the compile's
    warm-up pays for itself (unknown ``total_steps``: on, as before). ``cudnn_benchmark=auto``
    likewise, from :data:`CUDNN_BENCHMARK_MIN_STEPS_PER_SHAPE`.

    CUDA graphs are off (``auto``) or refused (``on``) where they would change what is trained
    or cannot be captured: no CUDA device, LoRA dropout (its random mask) and a trained text
    encoder (its backward runs outside the UNet). With fp16 the loss scale lives on the device,
    inside the optimizer graph. ``half_norms=auto`` is on for CUDA without a compiled UNet
    (a compile fuses autocast's casts around the norms by itself).
    Several processes keep them: the gradient all-reduce runs between the graphs
    (lora/train/distributed.py).
    """
    cuda = torch.device(device).type == "cuda"
    # low_memory: a compile's kernels and per-shape graphs cost ~0.5-1 GiB more than they save
    long_enough = _pays_back(total_steps, shapes, COMPILE_MIN_STEPS_PER_SHAPE)
    compile_on = _switch(cfg.speed.compile, "compile", cuda and not cfg.speed.low_memory and long_enough)
    channels_last = _switch(cfg.speed.channels_last, "channels_last", cuda)
    benchmark_pays = _pays_back(total_steps, shapes, CUDNN_BENCHMARK_MIN_STEPS_PER_SHAPE)
    cudnn_benchmark = _switch(cfg.speed.cudnn_benchmark, "cudnn_benchmark", cuda and benchmark_pays)
    # LoRA dropout draws a mask per projection: the fused product cannot share one input
    fused_qkv = _switch(cfg.speed.fused_qkv, "fused_qkv", cuda and cfg.lora_dropout == 0)
    if fused_qkv and cfg.lora_dropout > 0:
        raise ConfigError("invalid training config: fused_qkv: on is not possible with lora_dropout > 0 "
                          "(each projection draws its own dropout mask)")
    overlap_steps = _switch(cfg.speed.overlap_steps, "overlap_steps", cuda)
    compiled_cl = _switch(cfg.speed.compiled_channels_last, "compiled_channels_last", cuda and compile_on)
    if compiled_cl and not compile_on:
        raise ConfigError("invalid training config: compiled_channels_last: on needs compile (it is a "
                          "layout choice of the compiled UNet); compile is off here")
    # auto: off for a compiled UNet, which fuses autocast's casts around the norms itself
    half_norms = _switch(cfg.speed.half_norms, "half_norms", cuda and not compile_on)
    attention = cfg.speed.attention
    if attention == "auto":
        attention = AUTO_CUDA_ATTENTION if cuda else "default"
    compile_blocks = compile_on and cfg.speed.compile_scope == "blocks"
    blockers = []
    if not cuda:
        blockers.append("needs a CUDA device")
    if cfg.lora_dropout > 0:
        blockers.append("lora_dropout > 0 draws a random mask each step")
    if cfg.train_text_encoder:
        blockers.append("train_text_encoder runs the text encoder's backward outside the graph")
    # fp16 keeps them too: its loss scale lives on the device, inside the optimizer graph
    # (measured on an H200: 91.5 images/s, as bf16, bench/README.md "half norms"); so does
    # low_memory: with checkpointing, 5 bucket shapes held 3.2 GiB for 70 images/s against
    # 2.6 GiB for 12.5 without graphs (bench/README.md "ninth session")
    graphs = _switch(cfg.speed.cuda_graphs, "cuda_graphs", not blockers)
    if graphs and blockers:
        raise ConfigError(f"invalid training config: cuda_graphs: on is not possible here: {'; '.join(blockers)}")
    return FastOptions(compile=compile_on, cuda_graphs=graphs, channels_last=channels_last,
                       attention=attention, cudnn_benchmark=cudnn_benchmark, fused_qkv=fused_qkv,
                       overlap_steps=overlap_steps, compiled_channels_last=compiled_cl,
                       compile_blocks=compile_blocks, half_norms=half_norms)


def describe_fast_options(opts: FastOptions, cfg: TrainConfig, *, shapes: int, total_steps: int | None,
                          mixed_precision: str) -> str:
    """One line: what the fast path does in this run on a CUDA device, and why where ``auto`` chose."""
    parts = []
    if opts.compile:
        parts.append("compile=blocks (experimental: one compile for all bucket shapes)" if opts.compile_blocks
                     else f"compile=unet (one compile per bucket shape: {shapes})")
    elif cfg.speed.compile == "auto":
        why = ("low_memory" if cfg.speed.low_memory
               else f"{total_steps} steps over {shapes} bucket shape(s) are too few to pay back a compile "
                    f"per shape (< {COMPILE_MIN_STEPS_PER_SHAPE} steps a shape)")
        parts.append(f"compile off ({why})")
    else:
        parts.append("compile off")
    if opts.cuda_graphs:
        parts.append(f"CUDA graphs for {shapes} bucket shape(s)"
                     + (", partial batches padded into them" if opts.pad_batches else ""))
        if mixed_precision == "fp16":
            parts.append("fp16 loss scale on the device")
    else:
        parts.append("no CUDA graphs")
    for name in ("channels_last", "fused_qkv", "overlap_steps", "half_norms"):
        if getattr(opts, name):
            parts.append(name.replace("_", "-"))
    if opts.cudnn_benchmark:
        parts.append("cuDNN benchmark")
    elif cfg.speed.cudnn_benchmark == "auto":
        parts.append(f"cuDNN heuristics (< {CUDNN_BENCHMARK_MIN_STEPS_PER_SHAPE} steps a shape to pay back its timing)")
    if cfg.speed.low_memory or cfg.speed.gradient_checkpointing:
        parts.append("gradient checkpointing" + (" (low_memory)" if cfg.speed.low_memory else ""))
    return "fast path: " + ", ".join(parts)
