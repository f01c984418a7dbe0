"""How the UNet forward of a training step is prepared: channels-last, fused q/k/v, half-precision
norms and ``torch.compile``, and the process-wide CUDA settings that go with them.

What to turn on is decided by lora/train/speed/options.py; this module only applies it, so a
change of how the UNet is compiled stays here.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .half_norms import install_half_norms
from .options import FastOptions

log = logging.getLogger(__name__)

#: torch.compile backend of the fast path. Tests on CPU swap in "aot_eager" (same tracing and
#: autograd split, no C++/Triton code generation).
COMPILE_BACKEND = "inductor"


#: inductor options of the UNet's compile with ``compiled_channels_last`` (bench/blocks.py uses
#: them too, so the blocks it times are compiled as the trainer compiles them)
COMPILED_CHANNELS_LAST_OPTIONS = {"force_layout_optimization": True}

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


#: Cards with at most this much memory (GiB) get the allocator's expandable segments without
#: ``low_memory``. Why: on an H100 they cut a default run's memory held from 8.08 to 6.92 GiB
#: and the set-up's peak (the latent cache's VAE calls) from 14.6 to 6.9 GiB, at the same step
#: rate, but its eager work got slower (validations 2.3 against 1.5-1.7 s each, the graphs'
#: warm-up 18.4 against 16.2 s: 260 against 246 s projected for the guide's 20 epochs;
#: bench/README.md, fourteenth session). Where memory is short that trade is right, where it
#: is not the time is. 16 takes in T4-class cards (15 GiB).
EXPANDABLE_MAX_CARD_GIB = 16.0


def expandable_segments_reason(low_memory: bool, card_gib: float | None, allocator_conf: str | None) -> str | None:
    """Why a run turns on expandable segments (``"low_memory"``, ``"a card of 14.6 GiB"``), or
    None where it does not: they come under ``low_memory`` or on a card of at most
    :data:`EXPANDABLE_MAX_CARD_GIB`; never where the user's ``PYTORCH_CUDA_ALLOC_CONF`` already
    says either way (``allocator_conf``), nor without a card (``card_gib`` None)."""
    if card_gib is None or (allocator_conf and "expandable_segments" in allocator_conf):
        return None
    if low_memory:
        return "low_memory"
    return f"a card of {card_gib:.1f} GiB" if card_gib <= EXPANDABLE_MAX_CARD_GIB else None


def use_expandable_segments(why: str) -> bool:
    """Let the CUDA caching allocator grow segments instead of caching fixed blocks, so the
    memory held stays close to the memory in use (takes effect for new allocations); the log
    says so with ``why``. True if set."""
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None or not torch.cuda.is_available():
        return False
    try:
        setter("expandable_segments:True")
    except (RuntimeError, ValueError) as exc:  # an allocator that does not support it
        log.warning("could not enable expandable CUDA memory segments: %s", exc)
        return False
    log.info("expandable CUDA memory segments on (%s): less memory held, slower eager calls", why)
    return True


def use_compile_cache(folder: Path) -> bool:
    """Keep torch.compile's on-disk caches (compiled kernels, traced graphs) in ``folder``.

    Why: by default they go to a temporary folder that a new Colab/Kaggle session or container
    does not have, so every session compiles again. Kept beside the latent cache, a resumed
    segment or a second run on the same bucket shapes starts warm (one bucket shape's compile:
    137.8 s cold, 17.0 s from these caches on an H100, bench/README.md). A folder the user
    chose (``TORCHINDUCTOR_CACHE_DIR``) wins; torch writes its own default into that variable
    as soon as diffusers imports its compiler, and an earlier run in the same process (a
    notebook) wrote its workspace's folder, so neither value is taken for a choice. True if
    set here."""
    global _compile_dir_set_here
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # a run before this one in the same process (a notebook) set it for its own workspace
    if chosen and chosen != _compile_dir_set_here and not _is_torch_default_compile_dir(chosen):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only place: compile still works, only cold
        log.info("compile cache not kept (%s); torch.compile uses its default folder", exc)
        return False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _compile_dir_set_here = str(folder)
    return True


#: the folder :func:`use_compile_cache` last put into ``TORCHINDUCTOR_CACHE_DIR`` (not a user's choice)
_compile_dir_set_here: str | None = None


def _is_torch_default_compile_dir(value: str) -> bool:
    """Whether ``value`` is the folder torch's inductor picks (and writes into
    ``TORCHINDUCTOR_CACHE_DIR``) when nobody chose one: ``<tmp>/torchinductor_<user>``."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a torch without inductor: nothing of its own to tell apart
        return False
    return os.path.abspath(value) == os.path.abspath(default_cache_dir())


#: Where the CUDA driver keeps the kernels it compiles at run time (cuDNN's attention, PTX);
#: read once, when CUDA starts in a process. Unset: ``~/.nv/ComputeCache``.
DRIVER_CACHE_ENV = "CUDA_CACHE_PATH"


def use_driver_cache(folder: Path) -> bool:
    """Keep the CUDA driver's cache of run-time compiled kernels in ``folder``; call it before
    anything in the process starts CUDA.

    Why: cuDNN's attention, which PyTorch picks on Hopper cards, compiles its kernels at run
    time, once per attention shape: SD1.5's 30 shapes at the guide's buckets cost 8.3 s of
    first calls on a new H100 and 2.1 s when the driver's cache already held them
    (bench/first_calls.py). Its default folder lives in the home directory, which a new Colab
    session or container does not have; kept beside the latent and compile caches, the next
    session on the same workspace starts warm. A folder the user chose wins; where CUDA already
    started in this process (as far as torch can tell) the driver keeps the folder it read.
    Without a CUDA device nothing is set and no folder is made. True if set here."""
    if os.environ.get(DRIVER_CACHE_ENV) or torch.cuda.is_initialized():
        return False
    os.environ[DRIVER_CACHE_ENV] = str(folder)  # before is_available(), which starts the driver
    if not torch.cuda.is_available():
        del os.environ[DRIVER_CACHE_ENV]
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)  # the driver writes its first kernel later
    except OSError as exc:  # a read-only place: kernels are compiled again, nothing fails
        log.info("CUDA kernel cache not kept (%s)", exc)
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
        from .fused_qkv import install_fused_qkv  # diffusers' and peft's classes: loaded only here

        fused = install_fused_qkv(unet)
        log.info("fused q/k/v projections in %d attention layers", fused)
    if opts.half_norms:
        log.info("%d UNet norms keep bf16/fp16 activations", install_half_norms(unet))
    if not opts.compile:
        return unet
    _raise_recompile_limit()
    options = None
    if opts.compiled_channels_last and COMPILE_BACKEND == "inductor":
        # Inductor skips its channels-last layout for graphs with convolutions whose output has
        # at most half the input channels (the UNet's skip concatenations); without it each
        # convolution and its backward copies activations between layouts (bench/README.md).
        options = dict(COMPILED_CHANNELS_LAST_OPTIONS)
    if opts.compile_blocks:
        count = compile_blocks(unet, options)
        log.info("compiling %d UNet blocks (dynamic height/width: one compile for every bucket shape)", count)
        return unet
    return torch.compile(unet, dynamic=False, backend=COMPILE_BACKEND, options=options)


#: Module classes that ``compile_blocks`` compiles one by one: the blocks a UNet repeats, which
#: hold nearly all of its kernels (norms, activations, convolutions, attention, LoRA).
REPEATED_BLOCKS = ("ResnetBlock2D", "Transformer2DModel")


def compile_blocks(unet: torch.nn.Module, options: dict | None = None) -> int:
    """Compile each repeated block in place (``nn.Module.compile``; names and state dicts stay).

    Why blocks and not the whole UNet: a whole-UNet compile specialises on the latent shape, so
    every aspect bucket pays its own 1-2 minute compile and keeps its own kernels. Blocks of the
    same class and width share one compiled graph, and with dynamic height/width one compile
    serves every bucket; the glue between blocks (time embedding, up/down sampling, skip
    concatenations) stays eager and is captured in the step's CUDA graph with the rest.
    """
    count = 0
    for module in unet.modules():
        if type(module).__name__ in REPEATED_BLOCKS:
            module.compile(dynamic=True, backend=COMPILE_BACKEND, options=options)
            count += 1
    return count


def uncompile_blocks(unet: torch.nn.Module) -> None:
    """Undo :func:`compile_blocks` (the fall-back after a failed compile)."""
    for module in unet.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
