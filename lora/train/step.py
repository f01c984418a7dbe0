"""One optimizer step over cached latents, and the setup it needs (LoRA UNet, optimizer, scheduler).

Kept apart from the loop so the benchmark (bench/train.py) times exactly the step the trainer
runs, on a UNet it builds itself. :class:`StepRunner` does what every step does, whatever
runs its GPU work (the seeded draws, staging of the next step, the loss function, the lr
schedule), and hands the micro-batches to a step executor (lora/train/executor.py: the plain
one, or the CUDA-graphed one of lora/train/fastpath.py).
"""
from __future__ import annotations

import gc
import logging
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from lora.config import ConfigError, TrainConfig

from .batching import split_micro_batches
from .cache import CachedItems
from .distributed import GradientSync, rank_share
from .errors import is_out_of_memory, one_line
from .executor import MicroInputs, PendingStep, PlainExecutor, StepExecutor
from .fastpath import (FastOptions, GraphedExecutor, attention_context, describe_fast_options, prepare_forward,
                       resolve_fast_options, uncompile_blocks)
from .noise import draw_step, loss_weights, target_for
from .seeds import derive_seed

#: Test/chaos hook: comma-separated global step numbers whose first attempt raises
#: ``torch.OutOfMemoryError`` inside the forward pass (the real recovery path then runs).
FAKE_OOM_ENV = "ANIMELORA_FAKE_OOM_AT_STEP"

log = logging.getLogger(__name__)


def mixed_precision(cfg: TrainConfig) -> str:
    """``auto``: bf16 on a GPU that supports it, else full precision."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mp: str, **kwargs):
    """An ``Accelerator`` for ``mp``, even when this process already made one with another.

    accelerate keeps a process-wide singleton that refuses a second mixed-precision mode; a
    Prefect worker or a test session trains several runs in one process, so the singleton
    (not the distributed state) is reset first.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    for state in (AcceleratorState, GradientState):
        reset = getattr(state, "_reset_state", None)
        if reset is not None:
            reset()
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=1, **kwargs)


def weight_dtype(mp: str) -> torch.dtype:
    """dtype of the frozen base weights; LoRA weights always train in fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)


def setup_lora_unet(cfg: TrainConfig, unet, device, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Cast the frozen UNet, attach LoRA (seeded), keep LoRA in fp32; returns trainable params."""
    from diffusers.training_utils import cast_training_params

    from lora.model import attach_lora

    if dtype != torch.float32:
        unet.to(device, dtype=dtype)
    else:
        unet.to(device)
    attach_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                dropout=cfg.lora_dropout, init_seed=derive_seed(cfg.seed, "lora-init"))
    if dtype != torch.float32:
        keep_activation_dtype(unet)
    cast_training_params(unet, dtype=torch.float32)  # only the trainable (LoRA) weights
    trainable = {f"unet.{name}": p for name, p in unet.named_parameters() if p.requires_grad}
    if cfg.speed.gradient_checkpointing or cfg.speed.low_memory:
        unet.enable_gradient_checkpointing()
    unet.train()
    return trainable


def keep_activation_dtype(module: torch.nn.Module) -> None:
    """Stop peft from casting each LoRA layer's input to the fp32 LoRA weights' dtype.

    Why: every training forward runs under autocast, which casts a linear layer's input back
    to bf16/fp16 anyway, so peft's cast is an activation copy there and back that changes
    nothing: the LoRA matmuls see the same bf16 values either way. (Small: about 1 ms of an
    H200's 49 ms eager step at batch 4, bench/README.md.)
    """
    for m in module.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "invalid training config: optimizer: adamw8bit needs the bitsandbytes package "
                "(pip install bitsandbytes) and a CUDA GPU; use optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=True if fused else None)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    name = cfg.lr_scheduler
    if name == "constant" and cfg.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max(1, total_steps))


def fake_oom_steps() -> set[int]:
    raw = os.environ.get(FAKE_OOM_ENV, "")
    return {int(x) for x in raw.replace(" ", "").split(",") if x.strip().isdigit()}


__all__ = ["FAKE_OOM_ENV", "MicroInputs", "PendingStep", "StepRunner", "make_accelerator", "make_optimizer",
           "make_scheduler", "mixed_precision", "setup_lora_unet", "stack_to_device", "to_device", "weight_dtype"]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the GPU.

    A copy from ordinary (pageable) memory can block until the GPU has finished the work
    queued before it; from page-locked memory it is queued like a kernel."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def stack_to_device(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.stack(parts).to(device)``, stacked straight into page-locked memory on CUDA."""
    if torch.device(device).type != "cuda":
        return torch.stack(parts).to(device)
    buf = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
    torch.stack(parts, out=buf)
    return buf.to(device, non_blocking=True)


def _batches_key(batches: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(b) for b in batches)


class StepRunner:
    """Runs optimizer step ``n``: seeded draws, micro-batches, backward, clip, optimizer step.

    ``text_for(indices, caption_rng)`` gives the encoder hidden states of a micro-batch (from
    the cache, or encoded on the fly when captions are shuffled).
    """

    def __init__(self, cfg: TrainConfig, accelerator, unet, optimizer, lr_scheduler, noise_scheduler,
                 params: list[torch.nn.Parameter], cache: CachedItems,
                 text_for: Callable[[list[int], object], torch.Tensor],
                 fast: FastOptions | None = None, total_steps: int | None = None) -> None:
        self.cfg, self.accelerator, self.unet = cfg, accelerator, unet
        self.optimizer, self.lr_scheduler, self.noise_scheduler = optimizer, lr_scheduler, noise_scheduler
        self.params, self.cache, self.text_for = params, cache, text_for
        self.device = accelerator.device
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device)
        self.fake_oom = fake_oom_steps()
        #: several processes: each takes its share of every micro-batch (lora/train/distributed.py)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.sync = GradientSync(params, self.device) if self.world > 1 else None
        if fast is None:
            shapes = len({tuple(x.shape) for x in cache.latents})
            fast = resolve_fast_options(cfg, self.device, accelerator.num_processes,
                                        str(accelerator.mixed_precision), total_steps=total_steps, shapes=shapes)
            if self.device.type == "cuda":
                log.info(describe_fast_options(fast, cfg, shapes=shapes, total_steps=total_steps,
                                               mixed_precision=str(accelerator.mixed_precision)))
        self.fast: FastOptions = fast
        #: the UNet forward a step calls: the module itself, or compiled / channels-last (fastpath.py)
        self.forward = prepare_forward(unet, fast)
        #: what runs a step's GPU work (lora/train/executor.py); the fall-back may replace it
        self.executor: StepExecutor = self._graphed_executor() if fast.cuda_graphs else self._plain_executor()
        #: the next step's inputs, prepared while the GPU ran the step before (:meth:`stage`)
        self._staged: tuple[tuple, list[MicroInputs]] | None = None

    def _plain_executor(self) -> StepExecutor:
        return PlainExecutor(self.micro_loss, self.accelerator, self.optimizer, self.params,
                             self.cfg.max_grad_norm, self.sync)

    def _graphed_executor(self) -> StepExecutor:
        return GraphedExecutor(self.micro_loss, self.optimizer, self.params, self.device,
                               self.cfg.max_grad_norm, self.sync,
                               latent_shapes=[tuple(x.shape) for x in self.cache.latents],
                               num_train_timesteps=int(self.noise_scheduler.config.num_train_timesteps),
                               fp16=str(self.accelerator.mixed_precision) == "fp16",
                               pad_batches=self.fast.pad_batches)

    def _fall_back(self, exc: Exception) -> bool:
        """A compile or capture failure (not out-of-memory, not a test hook): turn off the failing
        part of the fast path, say so, and let the caller retry the step. True if it did."""
        if is_out_of_memory(exc):
            return False
        if self.fast.compile:
            log.warning("torch.compile failed (%s: %s); continuing without compile",
                        type(exc).__name__, one_line(exc))
            if self.fast.compile_blocks:
                uncompile_blocks(self.unet)
            self.fast = self.fast.without(compile=False, compile_blocks=False)
            self.forward = self.unet
            self.executor.forward_changed()
            return True
        if self.fast.cuda_graphs:
            log.warning("CUDA graph capture failed (%s: %s); continuing without CUDA graphs",
                        type(exc).__name__, one_line(exc))
            self.fast = self.fast.without(compile=False, cuda_graphs=False)
            scale = self.executor.loss_scale_state()
            self.executor = self._plain_executor()
            if scale is not None:  # fp16: the plain path goes on from the graphs' loss scale
                self.executor.load_loss_scale_state(scale)
            return True
        return False

    def loss_scale_state(self) -> dict | None:
        """fp16's loss scale for a checkpoint (None for bf16/fp32); see StepExecutor."""
        return self.executor.loss_scale_state()

    def load_loss_scale_state(self, state: dict) -> None:
        self.executor.load_loss_scale_state(state)

    def micro_capacity(self, divisor: int = 1) -> int:
        """Images of a full micro-batch on this process (a bucket's full batch, split for the
        out-of-memory fall-back and shared between processes)."""
        return math.ceil(math.ceil(self.cfg.batch_size / divisor) / self.world)

    @property
    def overlaps_steps(self) -> bool:
        """Whether the caller may queue the next step before reading this one's loss."""
        return self.fast.overlap_steps

    def release_failed_step(self) -> None:
        """After a step failed half-way (out of memory): drop its gradients and cached blocks."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def micro_loss(self, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor,
                   n_total: "int | torch.Tensor", sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        """A micro-batch's share of the step's mean loss; the one loss both paths train on.

        ``sample_weight`` (CUDA graphs' padded micro-batches): 1 per image, 0 per padding row, so
        padding adds exactly nothing to the loss or the gradients."""
        noisy = self.noise_scheduler.add_noise(lat, noise, t)
        with self.accelerator.autocast(), attention_context(self.fast.attention):
            pred = self.forward(noisy, t, ehs, return_dict=False)[0]
        target = target_for(self.noise_scheduler, lat, noise, t)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = loss_weights(self.alphas_cumprod, t, self.cfg.min_snr_gamma,
                               self.noise_scheduler.config.prediction_type)
        if weights is not None:
            per = per * weights
        if sample_weight is not None:
            per = per * sample_weight
        return per.sum() / n_total  # the step's mean, however it is split

    def _inputs(self, step_number: int, batches: list[list[int]], divisor: int) -> list[MicroInputs]:
        """This process's micro-batches of step ``step_number`` on the device: (latents, noise,
        timesteps, text). Pure function of (seed, step, batches, divisor, rank): staging it one
        step early changes nothing."""
        cfg, cache = self.cfg, self.cache
        flat = [i for b in batches for i in b]
        draws = draw_step(cfg.seed, step_number, [cache.latents[i].shape for i in flat],
                          num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
                          noise_offset=cfg.noise_offset, flip=cfg.flip)
        out: list[MicroInputs] = []
        pos = 0
        for whole in split_micro_batches(batches, divisor):
            start, end = rank_share(len(whole), self.rank, self.world)
            micro, first = whole[start:end], pos + start
            pos += len(whole)
            if not micro:  # more processes than images in this micro-batch
                continue
            sl = slice(first, first + len(micro))
            lat = stack_to_device([
                cache.latents_flip[i] if (cache.latents_flip and draws.flip[first + k]) else cache.latents[i]
                for k, i in enumerate(micro)
            ], self.device)
            noise = stack_to_device(draws.noise[sl], self.device)
            t = to_device(draws.timesteps[sl], self.device)
            ehs = self.text_for(micro, draws.caption_rng)
            out.append((lat, noise, t, ehs))
        return out

    def stage(self, step_number: int, batches: list[list[int]], divisor: int = 1) -> None:
        """Prepare step ``step_number``'s inputs now, while the GPU still runs the step before.

        Why: every step ends by reading its loss on the host, so without staging the GPU waits
        for the host to draw the next step's noise, stack the cached latents and copy them over
        (measured on an H200: 31.5 ms of kernels in a 34.9 ms batch-4 step). The draws are the
        same numbers either way (seeded by step), so staging changes nothing that is trained.
        A failure here is dropped: the step then builds its inputs itself and reports it.
        """
        self._staged = None
        if self.cfg.train_text_encoder:  # its forward belongs to the step's own autograd graph
            return
        try:
            key = (step_number, _batches_key(batches), divisor)
            self._staged = (key, self._inputs(step_number, batches, divisor))
        except Exception as exc:  # noqa: BLE001 - the step itself will try again and raise
            log.debug("could not stage step %d: %s", step_number, exc)

    def _take_inputs(self, step_number: int, batches: list[list[int]], divisor: int) -> list[MicroInputs]:
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == (step_number, _batches_key(batches), divisor):
            return staged[1]
        return self._inputs(step_number, batches, divisor)

    def run(self, step_number: int, batches: list[list[int]], divisor: int = 1,
            upcoming: tuple[int, list[list[int]]] | None = None) -> tuple[float, float]:
        """Returns (mean loss over the step's images, gradient norm before clipping).

        ``upcoming`` = (step number, batches) of the next step: its inputs are staged (see
        :meth:`stage`) after this step's GPU work is queued and before its loss is read."""
        return self.queue(step_number, batches, divisor, upcoming).values()

    def queue(self, step_number: int, batches: list[list[int]], divisor: int = 1,
              upcoming: tuple[int, list[list[int]]] | None = None) -> "PendingStep":
        """Queue step ``step_number`` (forward, backward, optimizer) and return without waiting
        for the GPU; :meth:`PendingStep.values` reads its loss and gradient norm later."""
        cfg = self.cfg
        n_total = sum(len(b) for b in batches)
        torch.manual_seed(derive_seed(cfg.seed, "torch-global", step_number))  # dropout etc.
        inputs = self._take_inputs(step_number, batches, divisor)
        if step_number in self.fake_oom and divisor == 1 and any(len(x[0]) > 1 for x in inputs):
            raise torch.OutOfMemoryError(f"fake out of memory at step {step_number} ({FAKE_OOM_ENV})")

        try:
            pending = self.executor.queue(inputs, n_total, self.micro_capacity(divisor))
        except Exception as exc:  # noqa: BLE001 - fall back to a slower path, never stop training
            if not self._fall_back(exc):
                raise
            pending = None
        if pending is None:
            # retried outside the except block: the failed attempt's traceback holds its loss and
            # with it an autograd graph whose gradient accumulators would outlive the attempt
            # (and could be recorded into the next capture on another stream)
            del inputs
            return self.queue(step_number, batches, divisor, upcoming)
        self.lr_scheduler.step()
        if upcoming is not None:
            self.stage(upcoming[0], upcoming[1], divisor)
        return pending
