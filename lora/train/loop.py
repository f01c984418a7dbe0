"""The training loop: one call trains (or resumes) a run for one segment.

``train(cfg, run_dir, stop_at_step=..., time_budget_s=...)`` continues from the newest intact
checkpoint, trains until the run is complete, the step target is reached or the time budget
is nearly spent, writes a checkpoint and returns. Calling it again continues the run; the
result is bit-identical (on CPU) to an uninterrupted run, because

- the data order of an epoch depends only on (seed, epoch) and the position inside the epoch
  is saved;
- every random draw of a step (timesteps, noise, flips, caption order, dropout) comes from
  generators seeded by (seed, global step);
- LoRA weights, optimizer, scheduler and RNG states are restored exactly.

Gradient accumulation is done here rather than by accelerate's ``accumulate()`` so that the
unit of work is the optimizer step: the out-of-memory fallback can split a step into more,
smaller micro-batches and still apply exactly the same effective batch.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lora.config import ConfigError, TrainConfig, make_config
from lora.runpaths import RunPaths

from . import checkpoint as ckpt
from .batching import epoch_steps
from .cache import ENCODE_BATCH, build_cache, encode_prompts, train_cache_root
from .distributed import AgreedFlag, any_process, is_main_launched_process, launched_rank
from .errors import NonFiniteLossError, TrainingError
from .export import training_metadata
from .host import host_threads_for
from .interrupt import StopSignals
from .log import TrainingLog
from .noise import shuffle_caption
from .pipeline import FinishedStep, StepPipeline
from .plan import DataPlan, make_plan
from .runfolder import lora_files, run_folder, run_lock, settle_finished_run
from .runfolder import pin_config as _pin_config
from .runfolder import write_config as _write_config
from .runstate import RunState
from .schedule import Boundary, Checkpoint, Interrupted, Progress, Schedule, StepTarget, TimeBudget, Validation
from .seeds import derive_seed
from .segment_stats import SegmentStats
from .step import (StepRunner, make_accelerator, make_optimizer, make_scheduler, mixed_precision,
                   setup_lora_unet, stack_to_device, weight_dtype)
from .validation import IMAGES_PER_CALL, has_base_record, validation_loss

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingError",
           "lora_files", "train"]


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    complete: bool
    stopped_reason: str  # "complete" | "step-target" | "time-budget" | "interrupted"
    run_dir: Path
    lora_files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# model setup




# --------------------------------------------------------------------------------------------
# the trainer


class _Trainer:
    """State of one segment: models, optimizer, caches and counters."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, plan: DataPlan,
                 on_progress: Callable[[dict], None] | None) -> None:
        from lora.model import load_components

        self.cfg, self.run_dir, self.plan = cfg, run_dir, plan
        self.on_progress = on_progress
        self.mp = mixed_precision(cfg)
        # cpu=True lets accelerate form a gloo process group when launched on a machine without CUDA
        self.accelerator = make_accelerator(self.mp, cpu=not torch.cuda.is_available())
        launched = launched_rank()[1]
        if launched != self.accelerator.num_processes:  # never train N independent copies
            raise TrainingError(f"launched as {launched} processes but accelerate formed a group of "
                                f"{self.accelerator.num_processes}; start with `accelerate launch` or torchrun")
        self.device = self.accelerator.device
        if cfg.speed.low_memory:
            from .fastpath import use_expandable_segments

            use_expandable_segments()  # before the first model tensor reaches the card
        # The UNet waits on the CPU until the latent cache is built: in fp32 beside the VAE's
        # activations it took an H200's set-up peak to 17.9 GiB; setup_lora_unet moves it in the
        # training dtype (half the size), tensor by tensor.
        comps = load_components(cfg.model, dtype=torch.float32, device="cpu")
        comps.vae.to(self.device)
        comps.text_encoder.to(self.device)
        self.noise_scheduler = comps.noise_scheduler
        self.tokenizer = comps.tokenizer
        self.text_encoder = comps.text_encoder
        self.live_text = cfg.caption_shuffle or cfg.train_text_encoder
        #: held-out images per UNet call when validating (smaller after an out-of-memory error)
        self.val_images_per_call = 1 if cfg.speed.low_memory else IMAGES_PER_CALL

        cache_root = train_cache_root(plan.dataset_dir, cfg.cache_dir)
        if torch.cuda.is_available():
            from .fastpath import use_compile_cache

            use_compile_cache(cache_root.parent / "compile")
        common = dict(root=cache_root, model_id=comps.model_id, vae=comps.vae,
                      text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                      resolution=cfg.resolution, device=self.device,
                      encode_batch=1 if cfg.speed.low_memory else ENCODE_BATCH)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        with self.accelerator.main_process_first():  # one process encodes, the others read the cache
            self.train_cache = build_cache(plan.train_items, plan.train_buckets, flip=cfg.flip, **common)
            self.val_cache = build_cache(plan.val_items, plan.val_buckets, flip=False, **common)
        comps.vae.to("cpu")
        comps.vae = None  # a step runs only the UNet (and the text encoder when captions change)
        if not self.live_text:
            self.text_encoder.to("cpu")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        dtype = weight_dtype(self.mp)
        try:
            self.trainable = setup_lora_unet(cfg, comps.unet, self.device, dtype)
        except ValueError as exc:  # e.g. target modules that the UNet does not have
            raise ConfigError(f"invalid training config: {exc}") from None
        groups = [{"params": list(self.trainable.values()), "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            from diffusers.training_utils import cast_training_params

            from lora.model import attach_text_encoder_lora

            self.text_encoder.to(self.device, dtype=dtype)
            attach_text_encoder_lora(self.text_encoder, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                     dropout=cfg.lora_dropout,
                                     init_seed=derive_seed(cfg.seed, "te-lora-init"))
            cast_training_params(self.text_encoder, dtype=torch.float32)
            te_params = []
            for name, p in self.text_encoder.named_parameters():
                if p.requires_grad:
                    self.trainable[f"text_encoder.{name}"] = p
                    te_params.append(p)
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
            if cfg.speed.gradient_checkpointing or cfg.speed.low_memory:
                enable = getattr(self.text_encoder, "activation_checkpointing_enable", None) or \
                    self.text_encoder.gradient_checkpointing_enable
                enable()
            self.text_encoder.train()
        optimizer = make_optimizer(cfg, groups)
        # evaluation_mode: autocast without a DDP wrapper; several processes average gradients
        # themselves, between the CUDA graphs (lora/train/distributed.py)
        self.unet = self.accelerator.prepare_model(comps.unet, evaluation_mode=True)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.lr_scheduler = make_scheduler(cfg, self.optimizer, plan.total_steps)
        self.runner = StepRunner(cfg, self.accelerator, self.unet, self.optimizer, self.lr_scheduler,
                                 self.noise_scheduler, list(self.trainable.values()), self.train_cache,
                                 self._text_for, total_steps=plan.total_steps)

    # -- state -------------------------------------------------------------------------------

    def restore(self, data: ckpt.CheckpointData) -> None:
        missing = set(self.trainable) - set(data.trainable)
        if missing:
            raise TrainingError(f"checkpoint {data.folder} lacks {len(missing)} LoRA tensors "
                                f"(e.g. {sorted(missing)[0]}); was it made with other LoRA settings?")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(data.trainable[name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(data.optimizer)
        self.lr_scheduler.load_state_dict(data.scheduler)
        if data.state.get("loss_scale"):  # fp16 (checkpoints before it: the scale starts afresh)
            self.runner.load_loss_scale_state(data.state["loss_scale"])
        ckpt.rng_restore(data.rng_json, data.rng_tensors)

    def _checkpoint_state(self, run: RunState) -> dict:
        """``state.json``: the run's counters, and fp16's loss scale where there is one."""
        state = run.to_checkpoint()
        scale = self.runner.loss_scale_state()
        if scale is not None:
            state["loss_scale"] = scale
        return state

    def save(self, run: RunState, training_log: TrainingLog) -> Path | None:
        """Checkpoint + log; only the main process writes (every process holds the same weights)."""
        if not self.is_main:
            return None
        folder = ckpt.write_checkpoint(
            RunPaths(self.run_dir).checkpoints, run.global_step,
            trainable={k: p.detach() for k, p in self.trainable.items()},
            optimizer=self.optimizer.state_dict(), scheduler=self.lr_scheduler.state_dict(),
            state=self._checkpoint_state(run), log_data=training_log.data,
        )
        training_log.write(self.run_dir)
        ckpt.prune(RunPaths(self.run_dir).checkpoints, self.cfg.keep_checkpoints)
        return folder

    # -- one optimizer step ------------------------------------------------------------------

    def _text_for(self, indices: list[int], captions_rng) -> torch.Tensor:
        if not self.live_text:
            return stack_to_device([self.train_cache.text[i] for i in indices], self.device)
        captions = []
        for i in indices:
            caption = self.plan.train_items[i].caption
            if self.cfg.caption_shuffle:
                caption = shuffle_caption(caption, self.cfg.keep_tokens, captions_rng)
            captions.append(caption)
        if self.cfg.train_text_encoder:
            with self.accelerator.autocast():
                return encode_prompts(self.tokenizer, self.text_encoder, captions, self.device).float()
        with torch.no_grad():
            return encode_prompts(self.tokenizer, self.text_encoder, captions, self.device).float()

    def validate(self) -> dict | None:
        return validation_loss(
            self.unet, self.noise_scheduler, self.val_cache.latents, self.val_cache.text,
            [i.name for i in self.plan.val_items], self.cfg.validation_timesteps, self.device,
            autocast=self.accelerator.autocast, images_per_call=self.val_images_per_call,
            on_smaller=self._validation_fits,
        )

    def _validation_fits(self, images: int) -> None:
        self.val_images_per_call = images

    def export(self, run: RunState) -> list[Path]:
        """Write both LoRA formats into ``run_dir/lora`` (temporary folder, then rename);
        the main process writes, the others wait for it."""
        from lora.model import export_diffusers, export_kohya, save_torch_dtype

        cfg = self.cfg
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return lora_files(self.run_dir, cfg.run_name or self.run_dir.name)
        unet = self.accelerator.unwrap_model(self.unet)
        te = self.text_encoder if cfg.train_text_encoder else None
        out = RunPaths(self.run_dir).lora
        tmp = self.run_dir / f".lora-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        export_diffusers(unet, tmp, text_encoder=te)
        kohya_name = RunPaths(self.run_dir).kohya_weights(cfg.run_name).name
        export_kohya(unet, tmp / kohya_name, rank=cfg.lora_rank, alpha=cfg.lora_alpha, text_encoder=te,
                     metadata=training_metadata(cfg, self.plan, run.to_checkpoint(), self.mp),
                     dtype=save_torch_dtype(cfg.save_dtype))
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return lora_files(self.run_dir, cfg.run_name or self.run_dir.name)


def train(
    cfg: TrainConfig,
    run_dir: Path | str,
    *,
    stop_at_step: int | None = None,
    time_budget_s: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
    extend: bool = False,
) -> TrainResult:
    """Train or resume the run in ``run_dir`` for one segment (see the module docstring).

    Stops at the end of the run ("complete"), at ``stop_at_step`` ("step-target"), before
    ``time_budget_s`` seconds since the call are spent ("time-budget") or after the current
    step on SIGINT / SIGTERM ("interrupted", lora/train/interrupt.py), always with a
    checkpoint on disk. ``on_progress`` gets ``{step, total_steps, epoch, loss, lr, eta_s,
    images_per_sec}`` after every step. On a GPU the run uses one torch CPU thread unless
    ``OMP_NUM_THREADS`` says otherwise (lora/train/host.py says why).

    One trainer per run folder (a second one gets :class:`~lora.train.runfolder.RunFolderError`);
    a finished run is trained further only with ``extend`` (lora/train/runfolder.py).
    """
    if stop_at_step is not None and (isinstance(stop_at_step, bool) or stop_at_step < 1):
        raise ConfigError(f"invalid training segment: stop_at_step must be >= 1, got {stop_at_step}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ConfigError(f"invalid training segment: time_budget_s must be > 0, got {time_budget_s}")
    run_dir = run_folder(run_dir)
    signals = StopSignals()
    with host_threads_for(torch.cuda.is_available()), run_lock(run_dir, enabled=is_main_launched_process()), \
            signals.installed():
        return _train_segment(cfg, run_dir, stop_at_step=stop_at_step, time_budget_s=time_budget_s,
                              on_progress=on_progress, signals=signals, extend=extend)


def _train_segment(
    cfg: TrainConfig,
    run_dir: Path | str,
    *,
    stop_at_step: int | None,
    time_budget_s: float | None,
    on_progress: Callable[[dict], None] | None,
    signals: StopSignals | None = None,
    extend: bool = False,
) -> TrainResult:
    """The body of :func:`train`."""
    started = time.monotonic()
    deadline = started + time_budget_s if time_budget_s is not None else None
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = _pin_config(cfg, run_dir)
    plan = make_plan(cfg, run_dir=run_dir)  # a started run keeps the split it recorded
    if cfg.dataset_version != plan.version:
        cfg = make_config({**cfg.model_dump(), "dataset_version": plan.version})
    if plan.total_steps < 1:
        raise ConfigError("invalid training config: the run has no steps (max_steps or epochs)")
    run_dir.mkdir(parents=True, exist_ok=True)
    main = is_main_launched_process()  # several processes (accelerate launch): one writes
    if main:
        _write_config(run_dir, cfg, plan)
    run_name = cfg.run_name or run_dir.name
    total = plan.total_steps
    ckpt_root = RunPaths(run_dir).checkpoints
    if main:
        ckpt.clean_temporaries(ckpt_root)

    latest = ckpt.latest_valid(ckpt_root)
    done_step = 0
    if latest is not None:
        done_step = json.loads((latest / ckpt.STATE).read_text())["global_step"]
    files = settle_finished_run(run_dir, run_name, total, done_step, extend=extend)
    if files is not None:  # finished at exactly this many steps: nothing to do
        return TrainResult(done_step, total, True, "complete", run_dir, files)
    if stop_at_step is not None and done_step >= stop_at_step:
        # a stop step the run has already reached: this segment (and every re-run of it) would
        # train nothing, so it is a bad limit, not "stopped early" (exit 3 means re-run and progress)
        raise ConfigError(f"the run in {run_dir} is already at step {done_step} of {total}, at or past its "
                          f"stop step {stop_at_step} (--stop-at-step): nothing to train; leave it out or "
                          "give a later step to continue")

    stats = SegmentStats()
    trainer = _Trainer(cfg, run_dir, plan, on_progress if main else None)
    stats.setup_done()
    if latest is not None:
        data = ckpt.load_checkpoint(latest)
        trainer.restore(data)
        run = RunState.from_checkpoint(data.state)  # the checkpoint's state.json and log, as written
        training_log = TrainingLog.resumed(data.log, total)
        log.info("resumed from %s (step %d/%d, epoch %d)", latest.name, run.global_step, total, run.epoch)
    else:
        run = RunState()
        training_log = TrainingLog.new(cfg, run_name=run_name, dataset_version=plan.version, total_steps=total,
                                       num_train_images=len(plan.train_items),
                                       num_validation_images=len(plan.val_items))
        log.info("starting run %s: %d steps (%d per epoch), %d training and %d validation images",
                 run_name, total, plan.steps_per_epoch, len(plan.train_items), len(plan.val_items))
    segment = _Segment(trainer, run, training_log, saved_step=run.global_step if latest is not None else -1,
                       stop_at_step=stop_at_step, deadline=deadline, signals=signals or StopSignals(),
                       stats=stats)
    return segment.train()


class _Segment:
    """One segment's loop: queue steps, run what is due between them, stop, save.

    The run's counters are a :class:`~lora.train.runstate.RunState`, the log a
    :class:`~lora.train.log.TrainingLog`; the steps in flight belong to a
    :class:`~lora.train.pipeline.StepPipeline` and the periodic work (progress, validation,
    checkpoints) and the stop rules (step target, signals, time budget) to a
    :class:`~lora.train.schedule.Schedule`.
    """

    def __init__(self, trainer: _Trainer, run: RunState, training_log: TrainingLog, *, saved_step: int,
                 stop_at_step: int | None, deadline: float | None, signals: StopSignals,
                 stats: SegmentStats) -> None:
        self.trainer, self.run, self.training_log = trainer, run, training_log
        self.stats = stats
        self.cfg, self.plan, self.total = trainer.cfg, trainer.plan, trainer.plan.total_steps
        self.saved_step = saved_step
        #: measured on the main process; the time budget keeps room for one of each
        self.checkpoint_s, self.validation_s = 1.0, 0.0
        self._epoch_order: tuple[int, list[list[list[int]]]] | None = None
        self.pipeline = StepPipeline(trainer.runner, self.cfg, on_finished=self._record,
                                     on_oom_retry=training_log.add_event)
        actions = []
        if trainer.on_progress is not None:
            actions.append(Progress(trainer.on_progress, training_log, self.total, self.pipeline))
        actions += [Validation(self.cfg.validate_every_steps, self._validate),
                    Checkpoint(self.cfg.checkpoint_every_steps, self.cfg.checkpoint_every_minutes, self._checkpoint)]
        stops = [StepTarget(stop_at_step),
                 Interrupted(lambda: signals.requested, AgreedFlag(trainer.device, trainer.world))]
        if deadline is not None:
            stops.append(TimeBudget(deadline, self.pipeline, self._reserved_s,
                                    lambda flag: any_process(flag, trainer.device, trainer.world)))
        self.schedule = Schedule(stops, actions, is_main=trainer.is_main)

    def train(self) -> TrainResult:
        self._validate_base_model()
        reason = "complete"
        while self.run.global_step < self.total:
            stop = self.schedule.stop_reason(self.run.global_step)
            if stop is not None:
                reason = stop
                break
            at = self._queue_next_step()
            due = self.schedule.due(at)
            if at.epoch_done or at.last or self.schedule.needs_drained(due):
                self.pipeline.drain()  # what follows (epoch summary, validation, a checkpoint) needs this step
            if at.epoch_done:
                self.training_log.close_epoch(at.epoch, self.run.train_time_s)
                self.run.next_epoch()
            self.schedule.run(due, at)
        self.pipeline.drain()  # stopped early (step target, time budget, signal): log the last step first
        self.schedule.end()
        if self.run.global_step >= self.total:
            return self._complete()
        return self._stop(reason)

    # -- steps -------------------------------------------------------------------------------

    def _steps_of_epoch(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's steps (each a list of batches of image indices), from (seed, epoch)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            cfg = self.cfg
            self._epoch_order = (epoch, epoch_steps(self.plan.train_buckets, cfg.batch_size,
                                                    cfg.gradient_accumulation, cfg.seed, epoch))
        return self._epoch_order[1]

    def _queue_next_step(self) -> Boundary:
        run = self.run
        steps = self._steps_of_epoch(run.epoch)
        number = run.global_step + 1
        # the next step of this epoch: the runner prepares its inputs while this step runs
        following = run.step_in_epoch + 1
        upcoming = (number + 1, steps[following]) if following < len(steps) and number < self.total else None
        queued = self.pipeline.queue(number, run.epoch, steps[run.step_in_epoch], run.micro_batch_divisor,
                                     upcoming)
        run.step_queued(queued.images, queued.divisor)
        return Boundary(step=number, epoch=queued.epoch, epoch_done=run.step_in_epoch >= len(steps),
                        last=number == self.total)

    def _record(self, done: FinishedStep) -> None:
        """A step's loss was read: count its time and log it."""
        self.run.train_time_s += done.seconds
        self.training_log.add_step(done.log_record(self.cfg))
        self.stats.step_read(done.step)

    # -- what the schedule runs --------------------------------------------------------------

    def _validate(self, step: int, epoch: int) -> None:
        t = time.monotonic()
        result = self.trainer.validate()
        self.validation_s = time.monotonic() - t
        self.stats.add("validation", self.validation_s)
        if result is not None:
            self.training_log.add_validation(step, epoch, result)

    def _validate_base_model(self) -> None:
        """Step 0: score the held-out images before the first step. The LoRA starts at zero, so
        this is the base model's figure: what every later evaluation, and the publish gate, is
        measured against. Done once per run (a resumed run already has it)."""
        if self.run.global_step == 0 and not has_base_record(self.training_log.data):
            self._validate(0, 0)

    def _checkpoint(self) -> None:
        self.training_log.set_global_step(self.run.global_step)
        self.training_log.set_segment(self.stats.record(self.trainer.runner))
        t = time.monotonic()
        if self.trainer.save(self.run, self.training_log) is not None:
            self.checkpoint_s = time.monotonic() - t
            self.stats.add("checkpoint", self.checkpoint_s)
        self.saved_step = self.run.global_step

    def _reserved_s(self) -> float:
        return self.checkpoint_s + self.validation_s

    # -- the end of the segment --------------------------------------------------------------

    def _complete(self) -> TrainResult:
        run, trainer, run_dir = self.run, self.trainer, self.trainer.run_dir
        self.training_log.close_epoch(run.last_epoch, run.train_time_s, partial=run.step_in_epoch != 0)
        if not self.training_log.has_validation_at(run.global_step):
            self._validate(run.global_step, run.last_epoch)
        if self.saved_step != run.global_step:
            self._checkpoint()
        t = time.monotonic()
        files = trainer.export(run)
        self.stats.add("export", time.monotonic() - t)
        self.training_log.set_segment(self.stats.record(trainer.runner))
        self.training_log.mark_complete(run.global_step)
        if trainer.is_main:
            self.training_log.write(run_dir)
        log.info("run %s complete at step %d; LoRA files in %s", self.cfg.run_name or run_dir.name,
                 run.global_step, RunPaths(run_dir).lora)
        return TrainResult(run.global_step, self.total, True, "complete", run_dir, files)

    def _stop(self, reason: str) -> TrainResult:
        run, trainer = self.run, self.trainer
        if self.saved_step != run.global_step and run.global_step > 0:
            self._checkpoint()
        elif trainer.is_main:
            self.training_log.set_global_step(run.global_step)
            self.training_log.set_segment(self.stats.record(trainer.runner))
            self.training_log.write(trainer.run_dir)
        trainer.accelerator.wait_for_everyone()  # the checkpoint is on disk before any process returns
        log.info("stopped at step %d/%d (%s)", run.global_step, self.total, reason)
        return TrainResult(run.global_step, self.total, False, reason, trainer.run_dir, [])
