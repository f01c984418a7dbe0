"""The data plan of a run: items, validation split, buckets and step counts.

It needs only image headers (no model), so the orchestration layer can ask how many steps a
run will take (``plan_total_steps``) before anything heavy is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora.config import ConfigError, TrainConfig
from lora.runpaths import RunPaths

from .batching import steps_per_epoch
from .buckets import Bucket, assign_bucket, buckets_for
from .dataset import Item, read_dataset, recorded_split, split_items


@dataclass
class DataPlan:
    dataset_dir: Path
    version: str
    train_items: list[Item]
    train_buckets: list[Bucket]
    val_items: list[Item]
    val_buckets: list[Bucket]
    steps_per_epoch: int
    total_steps: int
    #: every held-out image of the version (``val_items`` may score fewer: validation_max)
    held_out_items: list[Item] = field(default_factory=list)


def dataset_dir_of(cfg: TrainConfig, dataset_dir: Path | str | None = None) -> Path:
    source = dataset_dir if dataset_dir is not None else cfg.dataset
    if not source:
        raise ConfigError("invalid training config: dataset: required (a data-set folder)")
    return Path(source).expanduser().resolve()


def _recorded(run_dir: Path | str | None) -> tuple[list[str] | None, list[str]] | None:
    """``(held_out_images or None, validation_images)`` from a run's config.json, if recorded."""
    if run_dir is None:
        return None
    data = RunPaths(run_dir).read_config()
    val = data.get("validation_images") if data is not None else None
    if not isinstance(val, list):
        return None
    held = data.get("held_out_images")
    return (held if isinstance(held, list) else None), val


def make_plan(cfg: TrainConfig, dataset_dir: Path | str | None = None,
              run_dir: Path | str | None = None) -> DataPlan:
    """The run's data plan. With ``run_dir`` of a started run, its recorded split is used."""
    root = dataset_dir_of(cfg, dataset_dir)
    version, items = read_dataset(root, cfg.dataset_version)
    recorded = _recorded(run_dir)
    if recorded is not None:
        split = recorded_split(items, *recorded)
    else:
        limit = cfg.validation_max if cfg.validation_count is None else min(cfg.validation_count,
                                                                             cfg.validation_max)
        split = split_items(root, items, fraction=cfg.validation_fraction, limit=limit)
    train, val = split.train, split.validation
    bucket_list = buckets_for(cfg.resolution)
    train_buckets = [assign_bucket(i.image, bucket_list) for i in train]
    val_buckets = [assign_bucket(i.image, bucket_list) for i in val]
    spe = steps_per_epoch(train_buckets, cfg.batch_size, cfg.gradient_accumulation)
    total = spe * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return DataPlan(root, version, train, train_buckets, val, val_buckets, spe, total, split.held_out)


def plan_total_steps(cfg: TrainConfig, dataset_dir: Path | str | None = None,
                     run_dir: Path | str | None = None) -> int:
    """Optimizer steps the run will take: epochs x steps per epoch, capped by ``max_steps``."""
    return make_plan(cfg, dataset_dir, run_dir).total_steps
