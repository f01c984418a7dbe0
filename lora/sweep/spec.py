"""What a sweep trains: candidate recipes as a list or a grid, on one data-set version.

Why a spec apart from the runner: a killed sweep must resume exactly the sweep it was, so the
spec is pinned in the sweep's state on its first start (candidates, rungs, the data-set version)
and a second start with another spec is refused rather than mixing two sweeps' candidates.

Every candidate is checked as a full :class:`~lora.config.TrainConfig` (preset < base settings <
the candidate's own settings) before anything trains: an hour into a sweep is no time to find
that the fourth candidate's ``lora_rank`` is ``0``.
"""
from __future__ import annotations

import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora.config import ConfigError, TrainConfig, resolve_config
from lora.inputs import InputError, check_run_name

#: Short names for the settings sweeps vary most, used in candidate names (``lr0.0001-r8``).
SHORT_NAMES = {
    "learning_rate": "lr", "lora_rank": "r", "lora_alpha": "a", "epochs": "ep",
    "lr_scheduler": "", "warmup_steps": "wu", "gradient_accumulation": "acc",
    "min_snr_gamma": "snr", "noise_offset": "noise", "batch_size": "bs", "max_grad_norm": "clip",
    "lora_dropout": "drop", "weight_decay": "wd", "seed": "seed",
}
#: Settings a candidate may not set: they are the sweep's (one data set, one version, one
#: base model) or the run folder's (its name).
SWEEP_OWNED = frozenset({"dataset", "dataset_version", "model", "run_name", "preset"})


class SweepSpecError(InputError):
    """A sweep that cannot run as asked (one line, exit 2 on the command line)."""


@dataclass(frozen=True)
class Candidate:
    """One recipe: a name (part of its run folder's name) and the settings it changes."""

    name: str
    overrides: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": dict(self.overrides)}


@dataclass(frozen=True)
class SweepSpec:
    """A sweep, resolved: every candidate named, the base settings and the rungs in epochs.

    ``rungs`` are the epochs at which live candidates are compared and the clearly worse pruned
    before the end; the end of each candidate's run is always the last rung.
    """

    name: str
    preset: str
    base: dict[str, Any]
    candidates: tuple[Candidate, ...]
    rungs: tuple[int, ...] = field(default=())

    def config(self, candidate: Candidate) -> TrainConfig:
        """The candidate's full training config (its run name is ``<sweep>-<candidate>``)."""
        values = {**self.base, **candidate.overrides, "run_name": self.run_name(candidate)}
        return resolve_config(self.preset, values, None)

    def run_name(self, candidate: Candidate) -> str:
        return f"{self.name}-{candidate.name}"

    def rung_titles(self) -> list[str]:
        """What the report's columns and the plot's x axis call each rung (and the end)."""
        return [f"epoch {e}" for e in self.rungs] + ["end"]

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "base": dict(self.base),
                "candidates": [c.to_dict() for c in self.candidates], "rungs": list(self.rungs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepSpec":
        return cls(str(data["name"]), str(data["preset"]), dict(data.get("base") or {}),
                   tuple(Candidate(str(c["name"]), dict(c["overrides"])) for c in data["candidates"]),
                   tuple(int(r) for r in data.get("rungs") or ()))


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def candidate_name(overrides: Mapping[str, Any]) -> str:
    """A readable name from the settings a candidate changes (``lr0.0001-r8``); ``base`` for none."""
    parts = [f"{SHORT_NAMES.get(k, k)}{_value_text(v)}" for k, v in overrides.items()]
    return "-".join(parts) or "base"


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, keys in the order given (the first varies slowest)."""
    keys = list(grid)
    for key in keys:
        values = grid[key]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SweepSpecError(f"grid {key}: expected a non-empty list of values, got {values!r}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _named(entries: Sequence[Mapping[str, Any]]) -> list[Candidate]:
    """Candidates from settings dicts (a ``name`` key names one explicitly)."""
    out: list[Candidate] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise SweepSpecError(f"a candidate must be an object of settings, got {entry!r}")
        overrides = {k: v for k, v in entry.items() if k != "name"}
        name = str(entry.get("name") or candidate_name(overrides))
        out.append(Candidate(name, overrides))
    return out


def _check_candidates(name: str, preset: str, base: Mapping[str, Any],
                      candidates: Sequence[Candidate]) -> None:
    if len(candidates) < 2:
        raise SweepSpecError(f"sweep {name}: needs at least 2 candidates, got {len(candidates)} "
                             "(give a grid or a list of candidates)")
    seen_names: dict[str, Candidate] = {}
    seen_recipes: dict[str, str] = {}
    for cand in candidates:
        owned = sorted(SWEEP_OWNED & set(cand.overrides))
        if owned:
            raise SweepSpecError(f"candidate {cand.name}: {', '.join(owned)} is the sweep's setting, "
                                 "the same for every candidate (set it for the whole sweep)")
        if cand.name in seen_names:
            raise SweepSpecError(f"two candidates are named {cand.name!r}; give each a distinct name")
        seen_names[cand.name] = cand
        check_run_name(f"{name}-{cand.name}", what=f"candidate {cand.name!r}: run name")
        try:
            cfg = resolve_config(preset, {**base, **cand.overrides}, None)
        except ConfigError as exc:
            raise SweepSpecError(f"candidate {cand.name}: {exc}") from None
        recipe = cfg.model_dump_json()
        if recipe in seen_recipes:
            raise SweepSpecError(f"candidates {seen_recipes[recipe]} and {cand.name} train the same recipe")
        seen_recipes[recipe] = cand.name


def default_rungs(max_epochs: int, count: int = 2) -> tuple[int, ...]:
    """Successive halving over epochs: compare at E/2^count, ..., E/2 (then at the end, E).

    Why halving: a recipe that is clearly worse after a quarter of its epochs rarely recovers,
    and comparing early saves the most GPU time; later rungs catch the slower losers."""
    rungs = {max(1, math.floor(max_epochs / 2 ** k)) for k in range(1, count + 1)}
    return tuple(sorted(r for r in rungs if r < max_epochs))


def build_spec(name: str, *, preset: str | None = None, base: Mapping[str, Any] | None = None,
               grid: Mapping[str, Sequence[Any]] | None = None,
               candidates: Sequence[Mapping[str, Any]] | None = None,
               rungs: Sequence[int] | None = None) -> SweepSpec:
    """The sweep ``name``: the grid's combinations, then the listed candidates, each checked.

    ``base`` holds the settings every candidate shares (model, data set, version, ...);
    ``rungs`` the epochs to compare at before the end (default :func:`default_rungs`).
    """
    check_run_name(name, what="sweep name")
    base = {k: v for k, v in (base or {}).items() if v is not None}
    preset_name = preset or str(base.pop("preset", "") or "") or "phase2a"
    base.pop("preset", None)
    entries = [*(expand_grid(grid) if grid else []), *(candidates or [])]
    found = _named(entries)
    _check_candidates(name, preset_name, base, found)
    max_epochs = max(resolve_config(preset_name, {**base, **c.overrides}, None).epochs for c in found)
    if rungs is None:
        chosen = default_rungs(max_epochs)
    else:
        bad = [r for r in rungs if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        if bad:
            raise SweepSpecError(f"rungs: epochs must be whole numbers >= 1, got {bad}")
        chosen = tuple(sorted({r for r in rungs if r < max_epochs}))
    return SweepSpec(name, preset_name, dict(base), tuple(found), chosen)


def read_spec_file(path: Path | str) -> dict[str, Any]:
    """A JSON or TOML sweep file: ``preset``, ``rungs``, ``[base]``, ``[grid]``, ``[[candidates]]``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepSpecError(f"--spec {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SweepSpecError(f"--spec {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise SweepSpecError(f"--spec {path} must hold an object")
    unknown = sorted(set(data) - {"preset", "rungs", "base", "grid", "candidates"})
    if unknown:
        raise SweepSpecError(f"--spec {path}: unknown key(s) {', '.join(unknown)} "
                             "(expected preset, rungs, base, grid, candidates)")
    return data


def parse_value(raw: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true, lists), else the text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_grid_axis(item: str) -> tuple[str, list[Any]]:
    """``learning_rate=1e-4,5e-5`` -> (``learning_rate``, [0.0001, 5e-05])."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not raw.strip():
        raise SweepSpecError(f"--grid expects KEY=V1,V2,..., got {item!r}")
    return key, [parse_value(v.strip()) for v in raw.split(",")]


def parse_candidate(item: str) -> dict[str, Any]:
    """``"learning_rate=1e-4 lora_rank=8"`` (space- or ``;``-separated) -> settings dict."""
    out: dict[str, Any] = {}
    for part in item.replace(";", " ").split():
        key, sep, raw = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SweepSpecError(f"--candidate expects KEY=VALUE pairs, got {item!r}")
        out[key] = parse_value(raw)
    if not out:
        raise SweepSpecError("--candidate is empty")
    return out
