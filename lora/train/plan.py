"""The data plan of a run: items, validation split, buckets and step counts.

It needs only image headers (no model), so the orchestration layer can ask how many steps a
run will take (``plan_total_steps``) before anything heavy is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora.config import ConfigError, TrainConfig

from .batching import steps_per_epoch
from .buckets import Bucket, assign_bucket, buckets_for
from .dataset import Item, read_dataset, split_validation


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


def dataset_dir_of(cfg: TrainConfig, dataset_dir: Path | str | None = None) -> Path:
    source = dataset_dir if dataset_dir is not None else cfg.dataset
    if not source:
        raise ConfigError("invalid training config: dataset: required (a data-set folder)")
    return Path(source).expanduser().resolve()


def make_plan(cfg: TrainConfig, dataset_dir: Path | str | None = None) -> DataPlan:
    root = dataset_dir_of(cfg, dataset_dir)
    version, items = read_dataset(root, cfg.dataset_version)
    train, val = split_validation(
        items, cfg.seed, cfg.validation_fraction, cfg.validation_count, cfg.validation_max
    )
    bucket_list = buckets_for(cfg.resolution)
    train_buckets = [assign_bucket(i.image, bucket_list) for i in train]
    val_buckets = [assign_bucket(i.image, bucket_list) for i in val]
    spe = steps_per_epoch(train_buckets, cfg.batch_size, cfg.gradient_accumulation)
    total = spe * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return DataPlan(root, version, train, train_buckets, val, val_buckets, spe, total)


def plan_total_steps(cfg: TrainConfig, dataset_dir: Path | str | None = None) -> int:
    """Optimizer steps the run will take: epochs x steps per epoch, capped by ``max_steps``."""
    return make_plan(cfg, dataset_dir).total_steps
