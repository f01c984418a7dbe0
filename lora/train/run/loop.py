"""The training loop of one segment: queue steps, do what is due between them, stop, save.

Bit-identical on CPU to an uninterrupted run, however often it is resumed, because

- the data order of an epoch depends only on (seed, epoch) and the position inside the epoch
  is saved;
- every random draw of a step (timesteps, noise, flips, caption order, dropout) comes from
  generators seeded by (seed, global step);
- LoRA weights, optimizer, scheduler and RNG states are restored exactly.

Gradient accumulation is done here rather than by accelerate's ``accumulate()`` so that the
unit of work is the optimizer step: the out-of-memory fallback can split a step into more,
smaller micro-batches and still apply exactly the same effective batch.

A step from here to the optimizer reads down through three files: the pipeline
(lora/train/step/pipeline.py), the runner (step/runner.py) and an executor (step/executor.py);
a checkpoint is one call into lora/train/checkpoint/. Nothing below calls back up: the pipeline
returns the steps it read, the schedule says which actions are due and this loop does them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora.config import recipe
from lora.owned import NotOursError
from lora.runpaths import RunPaths
from lora.train import checkpoint as ckpt
from lora.train.checkpoint import RunState
from lora.train.data.batching import epoch_steps
from lora.train.distributed import AgreedFlag, any_process
from lora.train.errors import is_out_of_memory, one_line
from lora.train.export import export_lora
from lora.train.samples import IMAGES_PER_CALL as SAMPLES_PER_CALL
from lora.train.samples import Sampler, SamplerModels, SampleSet, TrainingSampleSettings, sample_epochs
from lora.train.setup.trainer import TrainingSetup
from lora.train.step.pipeline import FinishedStep, StepPipeline
from lora.train.validation import IMAGES_PER_CALL, has_base_record, validation_loss

from .events import EventLog
from .interrupt import StopSignals
from .log import TrainingLog
from .schedule import (Boundary, Checkpoint, Interrupted, Progress, Samples, Schedule, StepTarget, TimeBudget,
                       Validation)
from .stats import SegmentStats

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    complete: bool
    stopped_reason: str  # "complete" | "step-target" | "time-budget" | "interrupted"
    run_dir: Path
    lora_files: list[Path] = field(default_factory=list)
    #: optimizer steps this call trained (0: it stopped before the first, e.g. already at the step target)
    trained_steps: int = 0


class Segment:
    """One segment's loop over a :class:`~lora.train.setup.trainer.TrainingSetup`.

    The run's counters are a :class:`~lora.train.checkpoint.RunState`, the log a
    :class:`~lora.train.run.log.TrainingLog`; the steps in flight belong to a
    :class:`~lora.train.step.pipeline.StepPipeline` and the timing of the periodic work
    (progress, validation, samples, checkpoints) and the stop rules (step target, signals, time
    budget) to a :class:`~lora.train.run.schedule.Schedule`. Sets of samples are drawn by a
    :class:`~lora.train.samples.Sampler` and TensorBoard's events written by an
    :class:`~lora.train.run.events.EventLog`, both on the main process only.
    """

    def __init__(self, parts: TrainingSetup, run_dir: Path, run: RunState, training_log: TrainingLog, *,
                 saved_step: int, stop_at_step: int | None, deadline: float | None, signals: StopSignals,
                 stats: SegmentStats, on_progress: Callable[[dict], None] | None,
                 samples: TrainingSampleSettings | None = None,
                 on_samples: Callable[[SampleSet], None] | None = None) -> None:
        self.parts, self.run_dir, self.run, self.training_log = parts, run_dir, run, training_log
        self.stats = stats
        self.cfg, self.plan, self.total = parts.cfg, parts.plan, parts.plan.total_steps
        self.saved_step = saved_step
        self.first_step = run.global_step
        #: measured on the main process; the time budget keeps room for one of each
        self.checkpoint_s, self.validation_s, self.samples_s = 1.0, 0.0, 0.0
        #: held-out images per UNet call when validating (smaller after an out-of-memory error)
        self.val_images_per_call = 1 if self.cfg.speed.low_memory else IMAGES_PER_CALL
        self._epoch_order: tuple[int, list[list[list[int]]]] | None = None
        self.pipeline = StepPipeline(parts.runner, self.cfg)
        self.progress = Progress(on_progress, training_log, self.total, self.pipeline) if on_progress else None
        actions = [self.progress] if self.progress is not None else []
        actions.append(Validation(self.cfg.validate_every_steps))
        self.sampler = self._sampler(samples) if parts.is_main else None
        self.on_samples = on_samples
        if self.sampler is not None:  # before the checkpoint: its log records the set
            opts = self.cfg.samples
            actions.append(Samples(sample_epochs(opts, self.plan.steps_per_epoch, self.total), opts.every_steps,
                                   training_log))
        actions.append(Checkpoint(self.cfg.checkpoint_every_steps, self.cfg.checkpoint_every_minutes))
        self.events = EventLog.open(RunPaths(run_dir).tensorboard, run.global_step) if parts.is_main else None
        stops = [StepTarget(stop_at_step), Interrupted(signals, AgreedFlag(parts.device, parts.world))]
        self.budget = None
        if deadline is not None:
            self.budget = TimeBudget(deadline, self.pipeline, lambda flag: any_process(flag, parts.device, parts.world),
                                     reserved_s=self._reserved_s())
            stops.append(self.budget)
        self.schedule = Schedule(stops, actions, is_main=parts.is_main)

    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            if self.events is not None:
                self.events.close()

    def _train(self) -> TrainResult:
        self._validate_base_model()
        self._sample_base_model()
        reason = "complete"
        while self.run.global_step < self.total:
            stop = self.schedule.stop_reason(self.run.global_step)
            if stop is not None:
                reason = stop
                break
            at = self._queue_next_step()
            due = self.schedule.due(at)
            if at.epoch_done or at.last or self.schedule.needs_drained(due):
                self._drain()  # what follows (epoch summary, validation, a checkpoint) needs this step
            if at.epoch_done:
                self.training_log.close_epoch(at.epoch, self.run.train_time_s)
                if self.events is not None:
                    self.events.epoch(at.step, self.training_log.epoch_loss(at.epoch))
                self.run.next_epoch()
            for action in due:
                self._do(action, at)
        self._drain()  # stopped early (step target, time budget, signal): log the last step first
        if self.progress is not None:
            self.progress.report_new_steps()
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
        queued, finished = self.pipeline.queue(number, run.epoch, steps[run.step_in_epoch], run.micro_batch_divisor,
                                               upcoming)
        if queued.oom_event is not None:
            self.training_log.add_event(queued.oom_event)
        self._record(finished)
        run.step_queued(queued.images, queued.divisor)
        return Boundary(step=number, epoch=queued.epoch, epoch_done=run.step_in_epoch >= len(steps),
                        last=number == self.total)

    def _drain(self) -> None:
        self._record(self.pipeline.drain())

    def _record(self, finished: list[FinishedStep]) -> None:
        """Steps whose loss was read: count their time and log them."""
        for done in finished:
            self.run.train_time_s += done.seconds
            record = done.log_record(self.cfg)
            self.training_log.add_step(record)
            self.stats.step_read(done.step)
            if self.events is not None:
                self.events.step(record)

    # -- what is due between steps -----------------------------------------------------------

    def _do(self, action, at: Boundary) -> None:
        if isinstance(action, Progress):
            action.report_new_steps()
        elif isinstance(action, Validation):
            self._validate(at.step, at.epoch)
        elif isinstance(action, Samples):
            self._sample(at.step, at.epoch)
        elif isinstance(action, Checkpoint):
            self._checkpoint()
        action.done()

    def _validate(self, step: int, epoch: int) -> None:
        parts = self.parts
        t = time.monotonic()
        result = validation_loss(
            parts.unet, parts.noise_scheduler, parts.val_cache.latents, parts.val_cache.text,
            [i.name for i in self.plan.val_items], self.cfg.validation_timesteps, parts.device,
            autocast=parts.accelerator.autocast, images_per_call=self.val_images_per_call,
            on_smaller=self._validation_fits,
        )
        self.validation_s = time.monotonic() - t
        self._budget_changed()
        self.stats.add("validation", self.validation_s)
        if result is not None:
            self.training_log.add_validation(step, epoch, result)
            if self.events is not None:
                self.events.validation(step, result)

    def _validation_fits(self, images: int) -> None:
        self.val_images_per_call = images

    def _validate_base_model(self) -> None:
        """Step 0: score the held-out images before the first step. The LoRA starts at zero, so
        this is the base model's figure: what every later evaluation, and the publish gate, is
        measured against. Done once per run (a resumed run already has it)."""
        if self.run.global_step == 0 and not has_base_record(self.training_log.data):
            self._validate(0, 0)

    # -- samples while training --------------------------------------------------------------

    def _sampler(self, settings: TrainingSampleSettings | None) -> Sampler | None:
        parts = self.parts
        if settings is None or parts.vae is None:
            return None
        models = SamplerModels(parts.unet, parts.text_encoder, parts.tokenizer, parts.vae, parts.noise_scheduler,
                               parts.device, autocast=parts.accelerator.autocast)
        per_call = 1 if self.cfg.speed.low_memory else SAMPLES_PER_CALL
        return Sampler(models, settings, self.run_dir, images_per_call=per_call)

    def _sample_base_model(self) -> None:
        """Step 0's set: the base model (the LoRA starts at zero), once per run."""
        if (self.sampler is not None and self.cfg.samples.at_start and self.run.global_step == 0
                and 0 not in self.training_log.sample_steps()):
            self._sample(0, 0)

    def _sample(self, step: int, epoch: int) -> None:
        """Draw the set of ``step``. A set that cannot be drawn (out of memory, a full disk, a
        folder holding someone else's files) is skipped with a warning: samples never cost the
        training. It is not recorded, so a resumed run that reaches the step again draws it."""
        assert self.sampler is not None
        try:
            drawn = self.sampler.draw_set(step, epoch, self.training_log.sample_steps())
        except (NotOursError, OSError) as exc:
            log.warning("samples at step %d skipped: %s", step, one_line(exc))
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("samples at step %d skipped: out of memory (%s); lower samples.resolution or "
                        "turn them off (--set samples=off)", step, one_line(exc, 200))
            return
        self.samples_s = drawn.seconds
        self._budget_changed()
        self.stats.add("samples", drawn.seconds)
        self.training_log.add_samples(drawn.record)
        if self.events is not None:
            self.events.samples(step, self.sampler.strip(drawn))
        if self.on_samples is not None:
            try:
                self.on_samples(drawn)
            except Exception as exc:  # noqa: BLE001 - a broken display must not stop training
                log.warning("samples callback failed: %s", exc)

    def _checkpoint(self) -> None:
        """Checkpoint + log; only the main process writes (every process holds the same weights)."""
        self.training_log.set_global_step(self.run.global_step)
        self.training_log.set_segment(self.stats.record(self.parts.runner))
        t = time.monotonic()
        if self.parts.is_main:
            self._save()
            self.checkpoint_s = time.monotonic() - t
            self._budget_changed()
            self.stats.add("checkpoint", self.checkpoint_s)
        self.saved_step = self.run.global_step

    def _save(self) -> None:
        parts, runner = self.parts, self.parts.runner
        root = RunPaths(self.run_dir).checkpoints
        ckpt.write_checkpoint(
            root, self.run.global_step,
            trainable={k: p.detach() for k, p in parts.trainable.items()},
            optimizer=runner.optimizer.state_dict(), scheduler=runner.scheduler_state(),
            run=self.run, loss_scale=runner.loss_scale_state(), recipe=recipe(self.cfg),
            log_data=self.training_log.data,
        )
        self.training_log.write(self.run_dir)
        ckpt.prune(root, self.cfg.keep_checkpoints)
        if self.events is not None:
            self.events.flush()

    def _reserved_s(self) -> float:
        return self.checkpoint_s + self.validation_s + self.samples_s

    def _budget_changed(self) -> None:
        if self.budget is not None:
            self.budget.reserved_s = self._reserved_s()

    # -- the end of the segment --------------------------------------------------------------

    def _complete(self) -> TrainResult:
        run, parts, run_dir = self.run, self.parts, self.run_dir
        partial = run.step_in_epoch != 0  # max_steps ended the run inside an epoch
        self.training_log.close_epoch(run.last_epoch, run.train_time_s, partial=partial)
        if partial and self.events is not None:  # its mean, as the closed epochs' (marked in the log)
            self.events.epoch(run.global_step, self.training_log.epoch_loss(run.last_epoch))
        if not self.training_log.has_validation_at(run.global_step):
            self._validate(run.global_step, run.last_epoch)
        if self.saved_step != run.global_step:
            self._checkpoint()
        t = time.monotonic()
        files = export_lora(run_dir, self.cfg, self.plan, run, parts.mp, accelerator=parts.accelerator,
                            unet=parts.unet, text_encoder=parts.text_encoder if self.cfg.train_text_encoder else None)
        self.stats.add("export", time.monotonic() - t)
        self.training_log.set_segment(self.stats.record(parts.runner))
        self.training_log.mark_complete(run.global_step)
        if parts.is_main:
            self.training_log.write(run_dir)
        log.info("run %s complete at step %d; LoRA files in %s", self.cfg.run_name or run_dir.name,
                 run.global_step, RunPaths(run_dir).lora)
        return TrainResult(run.global_step, self.total, True, "complete", run_dir, files,
                           run.global_step - self.first_step)

    def _stop(self, reason: str) -> TrainResult:
        run, parts = self.run, self.parts
        if self.saved_step != run.global_step and run.global_step > 0:
            self._checkpoint()
        elif parts.is_main:
            self.training_log.set_global_step(run.global_step)
            self.training_log.set_segment(self.stats.record(parts.runner))
            self.training_log.write(self.run_dir)
        parts.accelerator.wait_for_everyone()  # the checkpoint is on disk before any process returns
        log.info("stopped at step %d/%d (%s)", run.global_step, self.total, reason)
        return TrainResult(run.global_step, self.total, False, reason, self.run_dir, [],
                           run.global_step - self.first_step)
