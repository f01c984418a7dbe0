"""One call trains (or resumes) a run for one segment: :func:`train`.

It resumes from the newest intact checkpoint or starts afresh, trains until the run is
complete, the step target is reached or the time budget is nearly spent, writes a checkpoint
and returns (lora/train/run/loop.py). Calling it again continues the run; the result is
bit-identical (on CPU) to an uninterrupted run.

What may resume: the run folder's ``config.json`` pins the run's settings
(lora/train/run/runfolder.py), and every checkpoint records the recipe that trained its
weights (``recipe.json``; the training log's settings for a checkpoint written before it). A
run never resumes under a recipe that changes what is trained, whatever happened to
``config.json``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lora.config import ConfigError, TrainConfig, config_differences, make_config, recipe
from lora.runpaths import RunPaths
from lora.train import checkpoint as ckpt
from lora.train.checkpoint import CheckpointData, RunState
from lora.train.data.cache import compiled_code_root
from lora.train.data.plan import dataset_dir_of, make_plan
from lora.train.distributed import is_main_launched_process
from lora.train.samples import SampleSet, TrainingSampleSettings, resolve_settings
from lora.train.setup.trainer import TrainingSetup, set_up
from lora.train.speed.compile import use_compile_cache, use_driver_cache

from .host import host_threads_for
from .interrupt import StopSignals
from .log import TrainingLog
from .loop import Segment, TrainResult
from .runfolder import RunFolderError, pin_config, run_folder, run_lock, settle_finished_run, write_config
from .stats import SegmentStats

log = logging.getLogger(__name__)


def train(
    cfg: TrainConfig,
    run_dir: Path | str,
    *,
    stop_at_step: int | None = None,
    time_budget_s: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
    extend: bool = False,
    on_samples: Callable[[SampleSet], None] | None = None,
) -> TrainResult:
    """Train or resume the run in ``run_dir`` for one segment (see the module docstring).

    Stops at the end of the run ("complete"), at ``stop_at_step`` ("step-target"), before
    ``time_budget_s`` seconds since the call are spent ("time-budget") or after the current
    step on SIGINT / SIGTERM ("interrupted", lora/train/run/interrupt.py), always with a
    checkpoint on disk. ``on_progress`` gets ``{step, total_steps, epoch, loss, lr, eta_s,
    images_per_sec}`` after every step; ``on_samples`` each set of samples drawn while training
    (lora/train/samples.py: ``cfg.samples``), once it is on disk. On a GPU the run uses one torch CPU thread unless
    ``OMP_NUM_THREADS`` says otherwise (lora/train/run/host.py says why).

    One trainer per run folder (a second one gets :class:`~lora.train.run.runfolder.RunFolderError`);
    a finished run is trained further only with ``extend`` (lora/train/run/runfolder.py).
    """
    if stop_at_step is not None and (isinstance(stop_at_step, bool) or stop_at_step < 1):
        raise ConfigError(f"invalid training segment: stop_at_step must be >= 1, got {stop_at_step}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ConfigError(f"invalid training segment: time_budget_s must be > 0, got {time_budget_s}")
    run_dir = run_folder(run_dir)
    _keep_compiled_code(cfg)  # before the first CUDA call below
    signals = StopSignals()
    with host_threads_for(torch.cuda.is_available()), run_lock(run_dir, enabled=is_main_launched_process()), \
            signals.installed():
        return _train_segment(cfg, run_dir, stop_at_step=stop_at_step, time_budget_s=time_budget_s,
                              on_progress=on_progress, signals=signals, extend=extend, on_samples=on_samples)


def _keep_compiled_code(cfg: TrainConfig) -> None:
    """The CUDA driver's kernel cache and torch.compile's caches beside the latent cache
    (lora/train/speed/compile.py, ``use_driver_cache``, ``use_compile_cache``), decided here
    for both. Best effort: a data set that cannot be found gets its clear error from the plan,
    a moment later."""
    try:
        root = compiled_code_root(dataset_dir_of(cfg), cfg.cache_dir)
    except (ConfigError, OSError):
        return
    use_driver_cache(root / "cuda")  # first: the driver reads it when CUDA starts
    if torch.cuda.is_available():
        use_compile_cache(root / "compile")


def _train_segment(
    cfg: TrainConfig,
    run_dir: Path | str,
    *,
    stop_at_step: int | None,
    time_budget_s: float | None,
    on_progress: Callable[[dict], None] | None,
    signals: StopSignals | None = None,
    extend: bool = False,
    on_samples: Callable[[SampleSet], None] | None = None,
) -> TrainResult:
    """The body of :func:`train`."""
    started = time.monotonic()
    deadline = started + time_budget_s if time_budget_s is not None else None
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = pin_config(cfg, run_dir)
    plan = make_plan(cfg, run_dir=run_dir)  # a started run keeps the split it recorded
    if cfg.dataset_version != plan.version:
        cfg = make_config({**cfg.model_dump(), "dataset_version": plan.version})
    if plan.total_steps < 1:
        raise ConfigError("invalid training config: the run has no steps (max_steps or epochs)")
    main = is_main_launched_process()  # several processes (accelerate launch): one writes
    ckpt_root = RunPaths(run_dir).checkpoints
    if main:
        ckpt.clean_temporaries(ckpt_root)
    latest = ckpt.latest_valid(ckpt_root)
    data = ckpt.load_checkpoint(latest) if latest is not None else None
    if data is not None:
        check_recipe(cfg, data, run_dir)  # before config.json is (re)written with cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        write_config(run_dir, cfg, plan)
    run_name = cfg.run_name or run_dir.name
    total = plan.total_steps
    done_step = data.run.global_step if data is not None else 0
    files = settle_finished_run(run_dir, run_name, total, done_step, extend=extend)
    if files is not None:  # finished at exactly this many steps: nothing to do
        return TrainResult(done_step, total, True, "complete", run_dir, files)
    if stop_at_step is not None and done_step >= stop_at_step:
        # already there: nothing to train (trained_steps 0; the command line says so, exit 2,
        # instead of "stopped early" forever; a sweep re-asking after a crash just goes on)
        return TrainResult(done_step, total, False, "step-target", run_dir, [])

    samples = sample_settings(cfg, plan) if main else None  # a bad prompt file: refused before set-up
    stats = SegmentStats()
    parts = set_up(cfg, plan)
    stats.setup_done(parts.setup_seconds)
    if data is not None:
        restore(parts, data)
        run = data.run  # the checkpoint's state.json and log, as written
        training_log = TrainingLog.resumed(data.log, total)
        log.info("resumed from %s (step %d/%d, epoch %d)", data.folder.name, run.global_step, total, run.epoch)
    else:
        run = RunState()
        training_log = TrainingLog.new(cfg, run_name=run_name, dataset_version=plan.version, total_steps=total,
                                       num_train_images=len(plan.train_items),
                                       num_validation_images=len(plan.val_items))
        log.info("starting run %s: %d steps (%d per epoch), %d training and %d validation images",
                 run_name, total, plan.steps_per_epoch, len(plan.train_items), len(plan.val_items))
    segment = Segment(parts, run_dir, run, training_log, saved_step=run.global_step if data is not None else -1,
                      stop_at_step=stop_at_step, deadline=deadline, signals=signals or StopSignals(), stats=stats,
                      on_progress=on_progress if main else None, samples=samples, on_samples=on_samples)
    return segment.train()


def sample_settings(cfg: TrainConfig, plan) -> TrainingSampleSettings | None:
    """What this segment's sets of samples draw; None when they are off. The default prompts
    start with the trigger word the captions were written with (lora.model.metadata)."""
    if not cfg.samples.enabled:
        return None
    from lora.model.metadata import infer_trigger_word

    trigger = infer_trigger_word(item.caption for item in plan.train_items)
    return resolve_settings(cfg.samples, tiny=cfg.model == "tiny", resolution=cfg.resolution, trigger=trigger)


# --------------------------------------------------------------------------------------------
# resuming a checkpoint

#: The training log's settings, for checkpoints written before they recorded their recipe:
#: what every log has held since the first release (``base_model`` is the ``model`` setting).
_LOGGED_RECIPE = {"epochs": "epochs", "batch_size": "batch_size", "learning_rate": "learning_rate",
                  "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "base_model": "model",
                  "gradient_accumulation": "gradient_accumulation", "lr_scheduler": "lr_scheduler",
                  "resolution": "resolution", "seed": "seed"}


def recorded_recipe(data: CheckpointData) -> Mapping[str, Any]:
    """The settings that trained a checkpoint's weights: its ``recipe.json``, else what its
    training log recorded (older checkpoints)."""
    if data.recipe is not None:
        return data.recipe
    return {field: data.log[key] for key, field in _LOGGED_RECIPE.items() if key in data.log}


def check_recipe(cfg: TrainConfig, data: CheckpointData, run_dir: Path) -> None:
    """Refuse to resume ``data`` under settings that change what is trained.

    Why here and not only against config.json: config.json may be gone, moved away or replaced;
    the checkpoint's own record is what its weights were trained with."""
    old = recorded_recipe(data)
    new = recipe(cfg)
    diffs = config_differences({k: v for k, v in old.items() if k in new}, {k: new[k] for k in old if k in new})
    if diffs:
        details = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diffs)
        raise RunFolderError(
            f"run folder {run_dir} holds checkpoints trained with other settings: {details} "
            f"({data.folder.name}); resume with the settings it was trained with or use another --run-dir"
        )


def restore(parts: TrainingSetup, data: CheckpointData) -> None:
    """Put a checkpoint's weights, optimizer, schedule, loss scale and RNG states back."""
    _check_tensors(parts.trainable, data)
    with torch.no_grad():
        for name, p in parts.trainable.items():
            p.copy_(data.trainable[name].to(p.device, p.dtype))
    parts.runner.optimizer.load_state_dict(data.optimizer)
    parts.runner.load_scheduler_state(data.scheduler)
    if data.loss_scale:  # fp16 (checkpoints before it: the scale starts afresh)
        parts.runner.load_loss_scale_state(data.loss_scale)
    ckpt.rng_restore(data.rng_json, data.rng_tensors)


def _check_tensors(trainable: Mapping[str, torch.Tensor], data: CheckpointData) -> None:
    """The checkpoint holds every LoRA tensor this run trains, each of the same shape."""
    missing = set(trainable) - set(data.trainable)
    if missing:
        raise RunFolderError(f"checkpoint {data.folder} lacks {len(missing)} LoRA tensors "
                             f"(e.g. {sorted(missing)[0]}); it was made with other LoRA settings "
                             "(target_modules, train_text_encoder): resume with those or use another --run-dir")
    for name, p in trainable.items():
        saved = tuple(data.trainable[name].shape)
        if saved != tuple(p.shape):
            raise RunFolderError(f"checkpoint {data.folder} holds LoRA tensors of another shape ({name}: "
                                 f"{list(saved)}, this run {list(p.shape)}); it was made with another "
                                 "lora_rank: resume with that or use another --run-dir")
