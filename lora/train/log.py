"""``training_log.json``: the guide's schema plus per-step and validation records.

Schema (docs/architecture.md)::

    {"epochs", "batch_size", "learning_rate", "lora_rank", "lora_alpha",
     "losses": [{"epoch", "loss", "time_seconds"}],        # the guide's schema, 1-based epochs
     "steps": [{"step", "epoch", "loss", "lr", "grad_norm", "images_per_sec"}],
     "validation": [{"step", "epoch", "loss", "per_timestep": {"100": ...}}],
     "preset", "run_name", "dataset_version", "base_model", "total_steps", "global_step",
     "complete"}

``time_seconds`` is the training time since the run started (summed over segments) when the
epoch ended. A copy of the log travels in every checkpoint, so a resumed run's log holds each
step exactly once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lora.config import TrainConfig

from .checkpoint import write_json_atomic

LOG_NAME = "training_log.json"


def new_log(cfg: TrainConfig, *, run_name: str, dataset_version: str, total_steps: int,
            num_train_images: int, num_validation_images: int) -> dict[str, Any]:
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "losses": [],
        "steps": [],
        "validation": [],
        "events": [],
        "preset": cfg.preset,
        "run_name": run_name,
        "dataset_version": dataset_version,
        "dataset_size": num_train_images + num_validation_images,
        "num_train_images": num_train_images,
        "num_validation_images": num_validation_images,
        "base_model": cfg.model,
        "gradient_accumulation": cfg.gradient_accumulation,
        "lr_scheduler": cfg.lr_scheduler,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        "total_steps": total_steps,
        "global_step": 0,
        "complete": False,
    }


def epoch_mean(log: dict[str, Any], epoch: int) -> float | None:
    losses = [s["loss"] for s in log["steps"] if s["epoch"] == epoch]
    return sum(losses) / len(losses) if losses else None


def close_epoch(log: dict[str, Any], epoch: int, time_seconds: float, partial: bool = False) -> None:
    """Add the guide's per-epoch record (mean of that epoch's step losses)."""
    mean = epoch_mean(log, epoch)
    if mean is None or any(r["epoch"] == epoch for r in log["losses"]):
        return
    row = {"epoch": epoch, "loss": mean, "time_seconds": round(time_seconds, 3)}
    if partial:
        row["partial"] = True
    log["losses"].append(row)


def write_log(run_dir: Path, log: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / LOG_NAME, log)
