"""Reading and checking `training_log.json`.

The blog guide's schema (``epochs``, ``batch_size``, ``learning_rate``, ``lora_rank``,
``lora_alpha`` and ``losses`` of ``{epoch, loss, time_seconds}``) must work on its own; the
trainer's extended records (``steps``, ``validation``, ``preset``...) are optional. Every
problem becomes a :class:`LogError` whose message is one line naming the file and the field,
so the CLI can print it as it is.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lora.runpaths import RunPaths



class LogError(ValueError):
    """A training log that is missing, empty or malformed (one-line message)."""


@dataclass(frozen=True)
class LossPoint:
    """One epoch of training loss (epochs are 1-based, as in the guide)."""

    epoch: int
    loss: float
    time_seconds: float | None = None


@dataclass(frozen=True)
class ValidationPoint:
    """One validation evaluation: mean loss at fixed timesteps and noise."""

    epoch: int | None
    step: int | None
    loss: float
    per_timestep: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingLog:
    """A checked training log: the loss series plus the settings worth reporting."""

    source: str | None
    losses: tuple[LossPoint, ...]
    validation: tuple[ValidationPoint, ...]
    settings: dict[str, Any]
    derived_from_steps: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


_SETTING_KEYS = (
    "epochs", "batch_size", "learning_rate", "lora_rank", "lora_alpha", "preset", "run_name",
    "dataset_version", "dataset_size", "base_model", "total_steps", "global_step", "complete",
)


def resolve_log_path(path: Path | str) -> Path:
    """A run folder means its ``training_log.json``; a file path is taken as it is."""
    path = Path(path)
    if path.is_dir():
        candidate = RunPaths(path).log
        if not candidate.is_file():
            raise LogError(f"{path}: no {candidate.name} in this folder (not a run folder?)")
        return candidate
    return path


def load_log(path: Path | str) -> dict[str, Any]:
    """Read a ``training_log.json`` (or a run folder's) and check its shape.

    Returns the raw dictionary; :func:`parse_log` gives the typed view. Raises
    :class:`LogError` for a missing, empty, non-JSON or malformed file.
    """
    file = resolve_log_path(path)
    if not file.exists():
        raise LogError(f"{file}: no such file")
    if not file.is_file():
        raise LogError(f"{file}: not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"{file}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if not text.strip():
        raise LogError(f"{file}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LogError(
            f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    parse_log(data, source=str(file))  # validate now so errors name the file
    return data


def _number(value: Any, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LogError(f"{source}: {where} must be a number, got {json.dumps(value)[:40]}")
    return float(value)


def _int(value: Any, where: str, source: str) -> int:
    number = _number(value, where, source)
    if not math.isfinite(number) or number != int(number):
        raise LogError(f"{source}: {where} must be a whole number, got {value!r}")
    return int(number)


def _parse_losses(data: Mapping[str, Any], source: str) -> list[LossPoint]:
    losses = data.get("losses")
    if losses is None:
        return []
    if not isinstance(losses, list):
        raise LogError(f"{source}: 'losses' must be a list of {{epoch, loss, time_seconds}}")
    points: list[LossPoint] = []
    for i, row in enumerate(losses):
        where = f"losses[{i}]"
        if not isinstance(row, Mapping):
            raise LogError(f"{source}: {where} must be an object with 'epoch' and 'loss'")
        if "loss" not in row:
            raise LogError(f"{source}: {where} has no 'loss'")
        loss = _number(row["loss"], f"{where}.loss", source)
        epoch = _int(row["epoch"], f"{where}.epoch", source) if "epoch" in row else i + 1
        seconds = row.get("time_seconds")
        points.append(LossPoint(
            epoch=epoch,
            loss=loss,
            time_seconds=None if seconds is None else _number(seconds, f"{where}.time_seconds",
                                                              source),
        ))
    # A resumed run may log an epoch again: the later record supersedes the earlier one.
    by_epoch = {p.epoch: p for p in points}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _losses_from_steps(data: Mapping[str, Any], source: str) -> list[LossPoint]:
    """Epoch means of the per-step records, for logs that stopped before an epoch ended."""
    steps = data.get("steps")
    if not isinstance(steps, list):
        return []
    by_epoch: dict[int, list[float]] = {}
    for i, row in enumerate(steps):
        if not isinstance(row, Mapping) or "loss" not in row:
            raise LogError(f"{source}: steps[{i}] must be an object with 'loss'")
        loss = _number(row["loss"], f"steps[{i}].loss", source)
        epoch = _int(row.get("epoch", 1), f"steps[{i}].epoch", source)
        by_epoch.setdefault(epoch, []).append(loss)
    return [LossPoint(epoch=e, loss=sum(v) / len(v)) for e, v in sorted(by_epoch.items())]


def _parse_validation(data: Mapping[str, Any], source: str) -> list[ValidationPoint]:
    rows = data.get("validation")
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise LogError(f"{source}: 'validation' must be a list of {{step, epoch, loss}}")
    points: list[ValidationPoint] = []
    for i, row in enumerate(rows):
        where = f"validation[{i}]"
        if not isinstance(row, Mapping) or "loss" not in row:
            raise LogError(f"{source}: {where} must be an object with 'loss'")
        per = row.get("per_timestep") or {}
        if not isinstance(per, Mapping):
            raise LogError(f"{source}: {where}.per_timestep must be an object")
        points.append(ValidationPoint(
            epoch=_int(row["epoch"], f"{where}.epoch", source) if row.get("epoch") is not None
            else None,
            step=_int(row["step"], f"{where}.step", source) if row.get("step") is not None
            else None,
            loss=_number(row["loss"], f"{where}.loss", source),
            per_timestep={str(k): _number(v, f"{where}.per_timestep[{k}]", source)
                          for k, v in per.items()},
        ))
    return points


def parse_log(data: Any, *, source: str | None = None) -> TrainingLog:
    """Check a loaded log and give its typed view (see the module docstring for the schema)."""
    where = source or "training log"
    if not isinstance(data, Mapping):
        raise LogError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "losses" not in data and "steps" not in data:
        raise LogError(f"{where}: no 'losses' (the per-epoch loss list) in the log")
    losses = _parse_losses(data, where)
    derived = False
    if not losses:
        losses = _losses_from_steps(data, where)
        derived = bool(losses)
    if not losses:
        raise LogError(f"{where}: 'losses' is empty: no epoch finished, nothing to analyze")
    settings = {key: data[key] for key in _SETTING_KEYS if key in data}
    return TrainingLog(
        source=source,
        losses=tuple(losses),
        validation=tuple(_parse_validation(data, where)),
        settings=settings,
        derived_from_steps=derived,
        raw=data,
    )
