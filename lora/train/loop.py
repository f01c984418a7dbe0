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
import math
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lora.config import ConfigError, TrainConfig, config_differences, make_config

from . import checkpoint as ckpt
from .batching import epoch_steps
from .cache import build_cache, encode_prompts
from .distributed import any_process, is_main_launched_process, launched_rank
from .host import host_threads_for
from .log import LOG_NAME, close_epoch, new_log, write_log
from .noise import shuffle_caption
from .plan import DataPlan, dataset_dir_of, make_plan
from .seeds import derive_seed
from .step import (PendingStep, StepRunner, make_accelerator, make_optimizer, make_scheduler, mixed_precision,
                   setup_lora_unet, stack_to_device, weight_dtype)
from .validation import validation_loss

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LORA_DIR = "lora"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
#: Kept free before a time budget ends, on top of the predicted step and checkpoint time.
BUDGET_MARGIN_S = 1.0


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. out of memory even at half the micro-batch)."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf (divergence); retry resumes from a checkpoint."""


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    complete: bool
    stopped_reason: str  # "complete" | "step-target" | "time-budget"
    run_dir: Path
    lora_files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# run folder and config


def _existing_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable run config ({exc}); move it away to start over") from None


def _pin_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """Normalise the config for this run folder and refuse a different existing run."""
    updates: dict[str, Any] = {"run_name": cfg.run_name or run_dir.name,
                               "dataset": str(dataset_dir_of(cfg))}
    existing = _existing_config(run_dir)
    old = (existing or {}).get("config")
    if old and cfg.dataset_version is None and old.get("dataset_version"):
        updates["dataset_version"] = old["dataset_version"]  # a run stays on its version
    cfg = make_config({**cfg.model_dump(), **updates})
    if old:
        diffs = config_differences(old, cfg.model_dump(mode="json"))
        if diffs:
            details = ", ".join(f"{k} ({old.get(k)!r} -> {getattr(cfg, k, None)!r})" for k in diffs)
            raise ConfigError(
                f"run folder {run_dir} holds a run with a different config: {details}; "
                "use another --run-dir or the same settings"
            )
    return cfg


def _write_config(run_dir: Path, cfg: TrainConfig, plan: DataPlan) -> None:
    ckpt.write_json_atomic(run_dir / CONFIG_NAME, {
        "config": cfg.model_dump(mode="json"),
        "dataset_version": plan.version,
        "base_model": cfg.model,
        "dataset_dir": str(plan.dataset_dir),
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "num_train_images": len(plan.train_items),
        "num_validation_images": len(plan.val_items),
        "validation_images": [i.name for i in plan.val_items],
    })


def lora_files(run_dir: Path, run_name: str) -> list[Path]:
    files = [run_dir / LORA_DIR / DIFFUSERS_FILE, run_dir / LORA_DIR / f"{run_name}.safetensors"]
    return files if all(p.is_file() for p in files) else []


def _read_log(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / LOG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------
# model setup


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


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
        if cfg.low_memory:
            from .fastpath import use_expandable_segments

            use_expandable_segments()  # before the first model tensor reaches the card
        comps = load_components(cfg.model, dtype=torch.float32, device=self.device)
        self.noise_scheduler = comps.noise_scheduler
        self.tokenizer = comps.tokenizer
        self.text_encoder = comps.text_encoder
        self.live_text = cfg.caption_shuffle or cfg.train_text_encoder

        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else plan.dataset_dir / "cache" / "train"
        common = dict(root=cache_root, model_id=comps.model_id, vae=comps.vae,
                      text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                      resolution=cfg.resolution, device=self.device)
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
            from lora.model import attach_text_encoder_lora

            self.text_encoder.to(self.device, dtype=dtype)
            attach_text_encoder_lora(self.text_encoder, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                     dropout=cfg.lora_dropout,
                                     init_seed=derive_seed(cfg.seed, "te-lora-init"))
            te_params = []
            for name, p in self.text_encoder.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float()
                    self.trainable[f"text_encoder.{name}"] = p
                    te_params.append(p)
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
            if cfg.gradient_checkpointing or cfg.low_memory:
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
                                 self._text_for)

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
        ckpt.rng_restore(data.rng_json, data.rng_tensors)

    def save(self, state: dict[str, Any], log_data: dict[str, Any]) -> Path | None:
        """Checkpoint + log; only the main process writes (every process holds the same weights)."""
        if not self.is_main:
            return None
        t = time.monotonic()
        folder = ckpt.write_checkpoint(
            self.run_dir / "checkpoints", state["global_step"],
            trainable={k: p.detach() for k, p in self.trainable.items()},
            optimizer=self.optimizer.state_dict(), scheduler=self.lr_scheduler.state_dict(),
            state=state, log_data=log_data,
        )
        write_log(self.run_dir, log_data)
        ckpt.prune(self.run_dir / "checkpoints", self.cfg.keep_checkpoints)
        self.last_save_s = time.monotonic() - t
        return folder

    last_save_s: float = 1.0  # measured after the first checkpoint; used by the time budget
    last_val_s: float = 0.0

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

    def queue_step(self, step_number: int, batches: list[list[int]], divisor: int,
                   upcoming: tuple[int, list[list[int]]] | None = None) -> PendingStep:
        return self.runner.queue(step_number, batches, divisor, upcoming)

    def validate(self) -> dict | None:
        return validation_loss(
            self.unet, self.noise_scheduler, self.val_cache.latents, self.val_cache.text,
            [i.name for i in self.plan.val_items], self.cfg.validation_timesteps, self.device,
            autocast=self.accelerator.autocast,
        )

    def export(self, state: dict[str, Any]) -> list[Path]:
        """Write both LoRA formats into ``run_dir/lora`` (temporary folder, then rename);
        the main process writes, the others wait for it."""
        from lora.model import export_diffusers, export_kohya, save_torch_dtype, training_metadata

        cfg = self.cfg
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return lora_files(self.run_dir, cfg.run_name or self.run_dir.name)
        unet = self.accelerator.unwrap_model(self.unet)
        te = self.text_encoder if cfg.train_text_encoder else None
        out = self.run_dir / LORA_DIR
        tmp = self.run_dir / f".lora-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        export_diffusers(unet, tmp, text_encoder=te)
        kohya_name = f"{cfg.run_name}.safetensors"
        export_kohya(unet, tmp / kohya_name, rank=cfg.lora_rank, alpha=cfg.lora_alpha, text_encoder=te,
                     metadata=training_metadata(cfg, self.plan, state, self.mp),
                     dtype=save_torch_dtype(cfg.save_dtype))
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return lora_files(self.run_dir, cfg.run_name or self.run_dir.name)


@dataclass
class _QueuedStep:
    """A step whose GPU work is queued and whose loss has not been read yet."""

    step: int
    epoch: int
    lr: float
    t0: float
    images: int
    divisor: int
    oom_retry: bool
    pending: PendingStep


def _queue_with_oom_retry(trainer: "_Trainer", log_data: dict[str, Any], step_number: int,
                          batches: list[list[int]], divisor: int,
                          upcoming: tuple[int, list[list[int]]] | None) -> tuple[PendingStep, int, bool]:
    """Queue a step; out of memory: retry once with micro-batches half the size (same effective
    batch). Returns (the queued step, the micro-batch divisor used, whether it was retried)."""
    cfg = trainer.cfg
    try:
        return trainer.queue_step(step_number, batches, divisor, upcoming), divisor, False
    except Exception as exc:
        if not _is_oom(exc):
            raise
        # keep only the text: the traceback pins the failed step's activations in memory
        oom_message = " ".join(str(exc).split())[:200]
    biggest = max(len(b) for b in batches)
    if math.ceil(biggest / divisor) <= 1:
        raise TrainingError(
            f"out of memory at step {step_number} with a micro-batch of 1 ({oom_message}); enable "
            "low_memory (or gradient_checkpointing), use mixed_precision=bf16 or a lower resolution"
        )
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    divisor *= 2
    micro = math.ceil(cfg.batch_size / divisor)
    log.warning("out of memory at step %d: retrying with micro-batch %d and %dx accumulation "
                "(same effective batch of %d)", step_number, micro,
                cfg.gradient_accumulation * divisor, cfg.batch_size * cfg.gradient_accumulation)
    log_data.setdefault("events", []).append({
        "step": step_number, "event": "oom-retry", "micro_batch": micro,
        "gradient_accumulation": cfg.gradient_accumulation * divisor,
        "effective_batch": cfg.batch_size * cfg.gradient_accumulation,
    })
    try:
        return trainer.queue_step(step_number, batches, divisor, upcoming), divisor, True
    except Exception as again:
        if _is_oom(again):
            raise TrainingError(
                f"out of memory at step {step_number} even with micro-batch {micro}; enable "
                "low_memory (or gradient_checkpointing), use mixed_precision=bf16, or lower batch_size/resolution"
            ) from None
        raise


def _progress_call(callback: Callable[[dict], None] | None, info: dict) -> None:
    if callback is None:
        return
    try:
        callback(info)
    except Exception as exc:  # noqa: BLE001 - a broken progress display must not stop training
        log.warning("progress callback failed: %s", exc)


def train(
    cfg: TrainConfig,
    run_dir: Path | str,
    *,
    stop_at_step: int | None = None,
    time_budget_s: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train or resume the run in ``run_dir`` for one segment (see the module docstring).

    Stops at the end of the run ("complete"), at ``stop_at_step`` ("step-target") or before
    ``time_budget_s`` seconds since the call are spent ("time-budget"), always with a
    checkpoint on disk. ``on_progress`` gets ``{step, total_steps, epoch, loss, lr, eta_s,
    images_per_sec}`` after every step. On a GPU the run uses one torch CPU thread unless
    ``OMP_NUM_THREADS`` says otherwise (lora/train/host.py says why).
    """
    with host_threads_for(torch.cuda.is_available()):
        return _train_segment(cfg, run_dir, stop_at_step=stop_at_step, time_budget_s=time_budget_s,
                              on_progress=on_progress)


def _train_segment(
    cfg: TrainConfig,
    run_dir: Path | str,
    *,
    stop_at_step: int | None,
    time_budget_s: float | None,
    on_progress: Callable[[dict], None] | None,
) -> TrainResult:
    """The body of :func:`train`."""
    started = time.monotonic()
    deadline = started + time_budget_s if time_budget_s is not None else None
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = _pin_config(cfg, run_dir)
    plan = make_plan(cfg)
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
    ckpt_root = run_dir / "checkpoints"
    if main:
        ckpt.clean_temporaries(ckpt_root)

    latest = ckpt.latest_valid(ckpt_root)
    done_step = 0
    if latest is not None:
        done_step = json.loads((latest / ckpt.STATE).read_text())["global_step"]
    existing_log = _read_log(run_dir)
    files = lora_files(run_dir, run_name)
    if done_step >= total and files and existing_log and existing_log.get("complete"):
        return TrainResult(done_step, total, True, "complete", run_dir, files)
    if stop_at_step is not None and done_step >= stop_at_step and done_step < total:
        return TrainResult(done_step, total, False, "step-target", run_dir, [])

    trainer = _Trainer(cfg, run_dir, plan, on_progress if main else None)
    state: dict[str, Any] = {"global_step": 0, "epoch": 1, "step_in_epoch": 0, "micro_batch_divisor": 1,
                             "train_time_s": 0.0, "images_seen": 0}
    log_data = new_log(cfg, run_name=run_name, dataset_version=plan.version, total_steps=total,
                       num_train_images=len(plan.train_items), num_validation_images=len(plan.val_items))
    if latest is not None:
        data = ckpt.load_checkpoint(latest)
        trainer.restore(data)
        state.update(data.state)
        log_data = data.log
        log_data["total_steps"] = total
        log.info("resumed from %s (step %d/%d, epoch %d)", latest.name, state["global_step"], total,
                 state["epoch"])
    elif total > 0:
        log.info("starting run %s: %d steps (%d per epoch), %d training and %d validation images",
                 run_name, total, plan.steps_per_epoch, len(plan.train_items), len(plan.val_items))

    reason = "complete"
    step_times: deque[float] = deque(maxlen=8)
    last_save = time.monotonic()
    saved_step = state["global_step"] if latest is not None else -1
    epoch_plan: tuple[int, list[list[list[int]]]] | None = None
    # read step n's loss while step n+1 runs (StepRunner.queue); off: read it before going on
    overlap = trainer.runner.fast.overlap_steps
    pending: _QueuedStep | None = None
    last_read = time.monotonic()

    def checkpoint_now() -> None:
        nonlocal last_save, saved_step
        log_data["global_step"] = state["global_step"]
        trainer.save(dict(state), log_data)
        last_save = time.monotonic()
        saved_step = state["global_step"]

    def finish(q: _QueuedStep) -> None:
        """Read a queued step's loss (waiting for its GPU work), check it and log the step."""
        nonlocal last_read
        loss, grad_norm = q.pending.values()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # The optimizer has already applied this step in memory (and with overlap_steps the
            # next one too), so stop before anything is saved: a retry resumes from the last
            # good checkpoint on disk, and a run that diverges the same way every time fails
            # with this message instead of looping.
            raise NonFiniteLossError(
                f"non-finite loss at step {q.step} (loss {loss}, gradient norm {grad_norm}); "
                "nothing after the last checkpoint was saved. If it repeats, lower learning_rate, "
                "set max_grad_norm, or use mixed_precision=bf16 instead of fp16"
            )
        now = time.monotonic()
        dt = now - max(q.t0, last_read)  # overlapped: the time since the step before was read
        last_read = now
        step_times.append(dt)
        state["train_time_s"] += dt
        record = {"step": q.step, "epoch": q.epoch, "loss": loss, "lr": q.lr, "grad_norm": grad_norm,
                  "images_per_sec": q.images / dt if dt > 0 else None, "images": q.images}
        if q.oom_retry or q.divisor > 1:
            record["micro_batch"] = math.ceil(cfg.batch_size / q.divisor)
            record["gradient_accumulation"] = cfg.gradient_accumulation * q.divisor
        if q.oom_retry:
            record["oom_retry"] = True
        log_data["steps"].append(record)
        log_data["global_step"] = q.step
        avg = sum(step_times) / len(step_times)
        _progress_call(trainer.on_progress, {
            "step": q.step, "total_steps": total, "epoch": q.epoch, "loss": loss, "lr": q.lr,
            "eta_s": avg * (total - q.step), "images_per_sec": record["images_per_sec"],
        })

    while state["global_step"] < total:
        if stop_at_step is not None and state["global_step"] >= stop_at_step:
            reason = "step-target"
            break
        if deadline is not None:
            slowest = max(step_times) if step_times else 0.0
            # the next step, and the one still running on the GPU when steps overlap
            in_flight = slowest if pending is not None else 0.0
            predicted = slowest + in_flight + trainer.last_save_s + trainer.last_val_s + BUDGET_MARGIN_S
            if any_process(time.monotonic() + predicted > deadline, trainer.device, trainer.world):
                reason = "time-budget"
                break
        epoch = state["epoch"]
        if epoch_plan is None or epoch_plan[0] != epoch:
            epoch_plan = (epoch, epoch_steps(plan.train_buckets, cfg.batch_size, cfg.gradient_accumulation,
                                             cfg.seed, epoch))
        steps = epoch_plan[1]
        batches = steps[state["step_in_epoch"]]
        step_number = state["global_step"] + 1
        # the next step of this epoch: the runner prepares its inputs while this step runs
        following = state["step_in_epoch"] + 1
        upcoming = (step_number + 1, steps[following]) if following < len(steps) and step_number < total else None
        lr = float(trainer.lr_scheduler.get_last_lr()[0])
        t0 = time.monotonic()
        divisor = state["micro_batch_divisor"]
        queued, divisor, oom_retry = _queue_with_oom_retry(trainer, log_data, step_number, batches, divisor,
                                                           upcoming)
        state["micro_batch_divisor"] = divisor
        if pending is not None:
            finish(pending)  # the step before, read while this one runs on the GPU
        pending = _QueuedStep(step_number, epoch, lr, t0, sum(len(b) for b in batches), divisor, oom_retry,
                              queued)
        state["global_step"] = step_number
        state["step_in_epoch"] += 1
        state["images_seen"] += pending.images

        epoch_done = state["step_in_epoch"] >= len(steps)
        due_val = (step_number % cfg.validate_every_steps == 0) if cfg.validate_every_steps else epoch_done
        due_ckpt = (cfg.checkpoint_every_steps and step_number % cfg.checkpoint_every_steps == 0) or (
            cfg.checkpoint_every_minutes and time.monotonic() - last_save >= cfg.checkpoint_every_minutes * 60)
        if not overlap or epoch_done or due_val or due_ckpt or step_number == total:
            finish(pending)  # what follows (epoch summary, validation, a checkpoint) needs this step
            pending = None
        if epoch_done:
            close_epoch(log_data, epoch, state["train_time_s"])
        if due_val or step_number == total:
            _validate_into(trainer, log_data, step_number, epoch)
        if epoch_done:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        if due_ckpt and step_number < total:
            checkpoint_now()
    if pending is not None:  # stopped early (step target, time budget): log the last step first
        finish(pending)

    if state["global_step"] >= total:
        last_epoch = state["epoch"] - (1 if state["step_in_epoch"] == 0 else 0)
        close_epoch(log_data, last_epoch, state["train_time_s"], partial=state["step_in_epoch"] != 0)
        if not any(v.get("step") == state["global_step"] for v in log_data.get("validation", [])):
            _validate_into(trainer, log_data, state["global_step"], last_epoch)
        if saved_step != state["global_step"]:
            checkpoint_now()
        files = trainer.export(state)
        log_data["complete"] = True
        log_data["global_step"] = state["global_step"]
        if trainer.is_main:
            write_log(run_dir, log_data)
        log.info("run %s complete at step %d; LoRA files in %s", run_name, state["global_step"],
                 run_dir / LORA_DIR)
        return TrainResult(state["global_step"], total, True, "complete", run_dir, files)

    if saved_step != state["global_step"] and state["global_step"] > 0:
        checkpoint_now()
    elif trainer.is_main:
        write_log(run_dir, {**log_data, "global_step": state["global_step"]})
    trainer.accelerator.wait_for_everyone()  # the checkpoint is on disk before any process returns
    log.info("stopped at step %d/%d (%s)", state["global_step"], total, reason)
    return TrainResult(state["global_step"], total, False, reason, run_dir, [])


def _validate_into(trainer: _Trainer, log_data: dict[str, Any], step: int, epoch: int) -> None:
    t = time.monotonic()
    result = trainer.validate()
    trainer.last_val_s = time.monotonic() - t
    if result is not None:
        log_data.setdefault("validation", []).append({"step": step, "epoch": epoch, **result})
