"""One optimizer step: the thin runner between the pipeline and an executor.

Kept apart from the loop so the benchmark (bench/train.py) times exactly the step the trainer
runs, on a UNet it builds itself. :class:`StepRunner` does what every step does, whatever runs
its GPU work: it seeds the step, takes its inputs (lora/train/step/inputs.py), hands them with
the one loss function (lora/train/step/loss.py) to a step executor (the plain one,
lora/train/step/executor.py, or the CUDA-graphed one, lora/train/step/graphed.py), steps the
learning-rate schedule (it alone does) and falls back from a failing fast path.
"""
from __future__ import annotations

import gc
import logging
import math
import os

import torch

from lora.config import TrainConfig
from lora.train.data.cache import CachedItems
from lora.train.distributed import GradientSync
from lora.train.errors import is_out_of_memory, one_line
from lora.train.seeds import derive_seed
from lora.train.speed.compile import prepare_forward, uncompile_blocks
from lora.train.speed.options import FastOptions, describe_fast_options, resolve_fast_options

from .executor import PendingStep, PlainExecutor, StepExecutor
from .graphed import GraphedExecutor
from .inputs import StepInputs, TextFor
from .loss import StepLoss

#: Test/chaos hook: comma-separated global step numbers whose first attempt raises
#: ``torch.OutOfMemoryError`` inside the forward pass (the real recovery path then runs).
FAKE_OOM_ENV = "ANIMELORA_FAKE_OOM_AT_STEP"

log = logging.getLogger(__name__)


def fake_oom_steps() -> set[int]:
    raw = os.environ.get(FAKE_OOM_ENV, "")
    return {int(x) for x in raw.replace(" ", "").split(",") if x.strip().isdigit()}


class StepRunner:
    """Runs optimizer step ``n``: seeded draws, micro-batches, backward, clip, optimizer step,
    then the learning-rate schedule's step (the one place the learning rate changes).

    ``text_for(indices, caption_rng)`` gives the encoder hidden states of a micro-batch (a
    :class:`~lora.train.step.inputs.TextSource`, or the benchmark's own function).
    """

    def __init__(self, cfg: TrainConfig, accelerator, unet, optimizer, lr_scheduler, noise_scheduler,
                 params: list[torch.nn.Parameter], cache: CachedItems, text_for: TextFor,
                 fast: FastOptions | None = None, total_steps: int | None = None) -> None:
        self.cfg, self.accelerator, self.unet = cfg, accelerator, unet
        self.optimizer, self.lr_scheduler, self.noise_scheduler = optimizer, lr_scheduler, noise_scheduler
        self.params, self.cache = params, cache
        self.device = accelerator.device
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
        #: the one loss function every executor trains on, around the UNet forward (compiled or not)
        self.micro_loss = StepLoss(noise_scheduler, prepare_forward(unet, fast), autocast=accelerator.autocast,
                                   attention=fast.attention, min_snr_gamma=cfg.min_snr_gamma, device=self.device)
        #: what runs a step's GPU work; the fall-back may replace it
        self.executor: StepExecutor = self._graphed_executor() if fast.cuda_graphs else self._plain_executor()
        self.inputs = StepInputs(cfg, cache, text_for,
                                 num_train_timesteps=int(noise_scheduler.config.num_train_timesteps),
                                 device=self.device, rank=self.rank, world=self.world)

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
            self.micro_loss.forward = self.unet
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

    @property
    def forward(self):
        """The UNet forward the step calls: the module, or compiled / channels-last."""
        return self.micro_loss.forward

    # -- what a checkpoint holds of the step ---------------------------------------------------

    def learning_rate(self) -> float:
        """The learning rate the next step trains with (the first param group's)."""
        return float(self.lr_scheduler.get_last_lr()[0])

    def scheduler_state(self) -> dict:
        return self.lr_scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        self.lr_scheduler.load_state_dict(state)

    def loss_scale_state(self) -> dict | None:
        """fp16's loss scale for a checkpoint (None for bf16/fp32); see StepExecutor."""
        return self.executor.loss_scale_state()

    def load_loss_scale_state(self, state: dict) -> None:
        self.executor.load_loss_scale_state(state)

    # -- one step ------------------------------------------------------------------------------

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

    def run(self, step_number: int, batches: list[list[int]], divisor: int = 1,
            upcoming: tuple[int, list[list[int]]] | None = None) -> tuple[float, float]:
        """Returns (mean loss over the step's images, gradient norm before clipping).

        ``upcoming`` = (step number, batches) of the next step: its inputs are staged
        (:meth:`StepInputs.stage`) after this step's GPU work is queued and before its loss is read."""
        return self.queue(step_number, batches, divisor, upcoming).values()

    def queue(self, step_number: int, batches: list[list[int]], divisor: int = 1,
              upcoming: tuple[int, list[list[int]]] | None = None) -> PendingStep:
        """Queue step ``step_number`` (forward, backward, optimizer) and return without waiting
        for the GPU; :meth:`PendingStep.values` reads its loss and gradient norm later."""
        cfg = self.cfg
        n_total = sum(len(b) for b in batches)
        torch.manual_seed(derive_seed(cfg.seed, "torch-global", step_number))  # dropout etc.
        inputs = self.inputs.take(step_number, batches, divisor)
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
            self.inputs.stage(upcoming[0], upcoming[1], divisor)
        return pending
