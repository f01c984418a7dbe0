"""The run folder: its config, its lock, its LoRA files, and what a new segment may do with it.

Why a module of its own: the loop trains; deciding whether a folder *may* be trained in (is it
a folder, is another trainer in it, does it hold another run, is that run finished) is about
the user's files, and every rule here exists so that nothing in a run folder is lost or
silently replaced:

- ``config.json`` pins a run's settings once the run has really started (a checkpoint, a
  logged step or LoRA files exist). A first attempt that failed before any step (a wrong
  ``--model``, no network) leaves a config that the next attempt may replace.
- The config carries a schema version. A config written by an older version lacks the fields
  added since; the run resumes with the values that reproduce what the older version did
  (:data:`LEGACY_VALUES`, else the field's default), instead of being refused.
- One trainer per run folder, enforced with an OS file lock (``.lock``) that the operating
  system releases when the process dies, so a SIGKILLed trainer never blocks the next one.
- A finished run is only trained further when asked (``extend``); its LoRA files are then kept
  in ``lora-step-<n>/`` instead of being replaced.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lora.config import (PRESETS, RESUME_TOLERANT_FIELDS, ConfigError, TrainConfig, config_differences, make_config,
                         nest_speed_options)
from lora.runpaths import LOCK_FILE, RunPaths

from lora.train import checkpoint as ckpt
from lora.train.data.plan import DataPlan, dataset_dir_of

log = logging.getLogger(__name__)

#: Version of config.json's layout. 1: no ``schema_version`` key (the first releases);
#: 2: ``schema_version`` written, fields missing from an older config take LEGACY_VALUES.
CONFIG_SCHEMA = 2
#: Fields added after the first release whose default is NOT what older versions did: a run
#: whose config lacks the field resumes with this value. A field that is missing here takes its
#: default, which must then reproduce the older behaviour (add an entry when it does not).
LEGACY_VALUES: dict[str, Any] = {}


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked (a file, busy, another or a finished run).

    A :class:`ConfigError`: a usage problem (exit 2) that retrying cannot fix.
    """


# --------------------------------------------------------------------------------------------
# the folder itself


def run_folder(run_dir: Path | str) -> Path:
    """The absolute run folder; a path that exists but is not a folder is refused."""
    path = Path(run_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run folder {path} is a file, not a folder; use another --run-dir")
    return path


@contextmanager
def run_lock(run_dir: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for one segment; a second trainer gets :class:`RunFolderError`.

    The lock is an OS lock on ``<run_dir>/.lock`` (``filelock``: ``fcntl`` / ``msvcrt``), so
    the operating system drops it when the holder dies, even by SIGKILL. ``enabled=False`` (the
    non-main processes of a data-parallel group, which share the main process's lock) holds
    nothing. A folder this call created is removed again if it is still empty afterwards.
    """
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder; use another --run-dir") from None
    except OSError as exc:  # a parent that is a file, no permission, a read-only mount
        raise RunFolderError(f"cannot create run folder {run_dir} ({exc.strerror or exc}); "
                             "use another --run-dir") from None
    lock_file = RunPaths(run_dir).lock
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError(
            f"run folder {run_dir} is in use by another trainer (it holds {lock_file}); "
            "wait for it to finish or use another --run-dir"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if created:
            _remove_if_empty(run_dir)


def _remove_if_empty(folder: Path) -> None:
    leftovers = [p for p in folder.iterdir() if p.name != LOCK_FILE] if folder.is_dir() else [None]
    if leftovers:
        return
    RunPaths(folder).lock.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def run_started(run_dir: Path) -> bool:
    """Whether a run has really begun here: a checkpoint, a logged step or LoRA files."""
    paths = RunPaths(run_dir)
    if ckpt.list_checkpoints(paths.checkpoints):
        return True
    logged = paths.read_log() or {}
    if logged.get("global_step") or logged.get("steps"):
        return True
    return bool(paths.lora_files())


# --------------------------------------------------------------------------------------------
# config.json


def existing_config(run_dir: Path) -> dict[str, Any] | None:
    path = RunPaths(run_dir).config
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(_unreadable(path, str(exc))) from None
    if not isinstance(data, dict):
        raise ConfigError(_unreadable(path, "not an object"))
    return data


def _unreadable(path: Path, why: str) -> str:
    """Why an unreadable config.json stops the run, and what each way out does (removing it
    does not start a new run: the checkpoints beside it resume, under the recipe they record)."""
    return (f"{path}: unreadable run config ({why}); to resume this run, delete the file (the checkpoints "
            "record the settings they were trained with); to start a new run, use another --run-dir")


def _json_defaults() -> dict[str, Any]:
    return TrainConfig().model_dump(mode="json")


def _upgrade(old: dict[str, Any], cfg: TrainConfig, schema: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """An older run's settings completed with the values that reproduce the older behaviour.

    Returns (the completed old settings, the updates to apply to ``cfg``): a field the old
    config lacks takes :data:`LEGACY_VALUES` or its default; ``cfg`` follows it unless the
    field was set to something else (a preset or the user), which then counts as a change.
    Fields that no longer exist are dropped.
    """
    defaults = _json_defaults()
    old = nest_speed_options(old)  # flat speed settings, as every config before SpeedOptions has them
    current = cfg.model_dump(mode="json")
    preset = PRESETS.get(cfg.preset, {})
    completed = {k: v for k, v in old.items() if k in defaults}
    dropped = sorted(set(old) - set(defaults))
    if dropped:
        log.warning("run config (schema %d) has settings this version no longer knows: %s; ignored",
                    schema, ", ".join(dropped))
    updates: dict[str, Any] = {}
    missing = [name for name in defaults if name not in completed]
    for name in missing:
        default = defaults[name]
        value = LEGACY_VALUES.get(name, default)
        completed[name] = value
        if name in RESUME_TOLERANT_FIELDS or current.get(name) == value:
            continue
        if current.get(name) == default or (name in preset and current.get(name) == preset[name]):
            updates[name] = value
    if missing:
        log.info("run config written by an older version (schema %d, without %s); resuming with the values "
                 "it was started with%s", schema, ", ".join(missing),
                 "".join(f", {k}={v!r}" for k, v in sorted(updates.items())))
    return completed, updates


def pin_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """Normalise the config for this run folder and refuse a different, started run.

    A config left by an attempt that never trained a step is replaced, not enforced.
    """
    config_file = RunPaths(run_dir).config
    updates: dict[str, Any] = {"run_name": cfg.run_name or run_dir.name,
                               "dataset": str(dataset_dir_of(cfg))}
    existing = existing_config(run_dir)
    if existing is not None and not run_started(run_dir):
        log.info("%s is from an attempt that never trained a step; replacing it", config_file)
        existing = None
    old = (existing or {}).get("config")
    if old is not None and not isinstance(old, dict):
        raise ConfigError(_unreadable(config_file, "'config' is not an object"))
    if old:
        schema = existing.get("schema_version", 1)
        if not isinstance(schema, int) or schema > CONFIG_SCHEMA:
            raise RunFolderError(f"{config_file} was written by a newer animelora (config schema "
                                 f"{schema}, this version reads up to {CONFIG_SCHEMA}); upgrade to resume it")
        old, legacy = _upgrade(old, cfg, schema)
        updates = {**legacy, **updates}
        if cfg.dataset_version is None and old.get("dataset_version"):
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


def write_config(run_dir: Path, cfg: TrainConfig, plan: DataPlan) -> None:
    ckpt.write_json_atomic(RunPaths(run_dir).config, {
        "schema_version": CONFIG_SCHEMA,
        "config": cfg.model_dump(mode="json"),
        "dataset_version": plan.version,
        "base_model": cfg.model,
        "dataset_dir": str(plan.dataset_dir),
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "num_train_images": len(plan.train_items),
        "num_validation_images": len(plan.val_items),
        "validation_images": [i.name for i in plan.val_items],
        "held_out_images": [i.name for i in plan.held_out_items],
    })


# --------------------------------------------------------------------------------------------
# outputs


def lora_files(run_dir: Path, run_name: str) -> list[Path]:
    """The run's two exported LoRA files, or [] unless both exist."""
    return RunPaths(run_dir).exported_lora_files(run_name)


def settle_finished_run(run_dir: Path, run_name: str, total: int, done_step: int, *,
                        extend: bool = False) -> list[Path] | None:
    """What a new segment does with a run that already reached ``done_step`` (its newest checkpoint).

    Returns the LoRA files when the run is finished at exactly ``total`` steps (nothing to
    do), None when training may go on. Refuses (:class:`RunFolderError`) to shorten a run
    below the steps it has done, and to train a finished run further unless ``extend``;
    with ``extend`` the finished run's LoRA files are kept in ``lora-step-<n>/`` and
    training continues from its final checkpoint.
    """
    paths = RunPaths(run_dir)
    finished_at = paths.finished_step()
    if finished_at is None:
        if done_step > total:
            raise RunFolderError(
                f"the run in {run_dir} is already at step {done_step}, beyond the {total} steps asked for; "
                f"use --max-steps {done_step} or more, or another --run-dir"
            )
        return None
    if total == finished_at:
        return lora_files(run_dir, run_name) or None  # files gone: export them again
    if total < finished_at:
        raise RunFolderError(
            f"the run in {run_dir} finished at step {finished_at}, more than the {total} steps asked for; "
            f"its LoRA files are from step {finished_at} (use another --run-dir for a shorter run)"
        )
    if not extend:
        raise RunFolderError(
            f"the run in {run_dir} finished at step {finished_at}; training on to step {total} would replace "
            "its LoRA files: pass --extend to continue from its final checkpoint"
        )
    if done_step != finished_at:
        raise RunFolderError(f"cannot extend the run in {run_dir}: no intact checkpoint of its final step "
                             f"{finished_at} (newest: {done_step})")
    lora_dir, kept = paths.lora, paths.kept_lora(finished_at)
    if lora_dir.exists():
        if kept.exists():
            raise RunFolderError(f"cannot extend the run in {run_dir}: both {lora_dir} and {kept} exist; "
                                 f"move one of them away")
        os.replace(lora_dir, kept)
        log.info("extending run %s from step %d to %d; its step-%d LoRA files are kept in %s",
                 run_name, finished_at, total, finished_at, kept)
    return None
