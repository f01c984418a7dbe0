"""``training_log.json``: the guide's schema plus per-step and validation records.

Schema (docs/architecture.md)::

    {"epochs", "batch_size", "learning_rate", "lora_rank", "lora_alpha",
     "losses": [{"epoch", "loss", "time_seconds"}],        # the guide's schema, 1-based epochs
     "steps": [{"step", "epoch", "loss", "lr", "grad_norm", "images_per_sec"}],
     "validation": [{"step", "epoch", "loss", "per_timestep": {"100": ...}}],
     "samples": [{"step", "epoch", "images", "seconds"}],   # sets drawn while training
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

from lora.runpaths import RunPaths

from lora.train.checkpoint import write_json_atomic



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
    write_json_atomic(RunPaths(run_dir).log, log)


class TrainingLog:
    """The training log of a run while a segment trains: every change goes through here.

    ``data`` is the JSON object written as ``training_log.json`` (and into each checkpoint);
    the loop never edits it directly, so what a record holds is decided in one place.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def new(cls, cfg: TrainConfig, **fields: Any) -> "TrainingLog":
        return cls(new_log(cfg, **fields))

    @classmethod
    def resumed(cls, data: dict[str, Any], total_steps: int) -> "TrainingLog":
        """The log a checkpoint carries; ``total_steps`` may have changed with the data set."""
        data["total_steps"] = total_steps
        return cls(data)

    @property
    def global_step(self) -> int:
        return int(self.data.get("global_step", 0))

    def set_global_step(self, step: int) -> None:
        self.data["global_step"] = step

    def add_step(self, record: dict[str, Any]) -> None:
        self.data["steps"].append(record)
        self.data["global_step"] = record["step"]

    def steps_after(self, step: int) -> list[dict[str, Any]]:
        """The step records after ``step``, oldest first (the ones not reported yet)."""
        out = []
        for record in reversed(self.data["steps"]):
            if record["step"] <= step:
                break
            out.append(record)
        return out[::-1]

    def add_event(self, event: dict[str, Any]) -> None:
        self.data.setdefault("events", []).append(event)

    def add_validation(self, step: int, epoch: int, result: dict[str, Any]) -> None:
        self.data.setdefault("validation", []).append({"step": step, "epoch": epoch, **result})

    def add_samples(self, record: dict[str, Any]) -> None:
        """A set drawn while training (lora/train/samples.py); one per step, the latest kept."""
        records = [r for r in self.data.get("samples", []) if r.get("step") != record["step"]]
        self.data["samples"] = sorted([*records, record], key=lambda r: r["step"])

    def sample_steps(self) -> list[int]:
        """The global steps whose sets were drawn (a resumed run draws none of them again)."""
        return [int(r["step"]) for r in self.data.get("samples", []) if isinstance(r.get("step"), int)]

    def epoch_loss(self, epoch: int) -> float | None:
        """The guide's per-epoch loss of ``epoch`` once it is closed."""
        return next((r["loss"] for r in self.data["losses"] if r["epoch"] == epoch), None)

    def has_validation_at(self, step: int) -> bool:
        return any(v.get("step") == step for v in self.data.get("validation", []))

    def close_epoch(self, epoch: int, time_seconds: float, partial: bool = False) -> None:
        close_epoch(self.data, epoch, time_seconds, partial=partial)

    def set_segment(self, entry: dict[str, Any]) -> None:
        """This segment's entry in ``segments`` (lora/train/run/stats.py): appended once,
        then replaced as the segment goes on."""
        segments = self.data.setdefault("segments", [])
        if segments and segments[-1].get("started_at") == entry["started_at"]:
            segments[-1] = entry
        else:
            segments.append(entry)

    def mark_complete(self, step: int) -> None:
        self.data["complete"] = True
        self.data["global_step"] = step

    def write(self, run_dir: Path) -> None:
        write_log(run_dir, self.data)
