"""Comparing runs, as the guide compared v1.5 with v2a.

The guide ranked runs by training-loss improvement %. That figure moves a few percent by chance
(random timesteps). Runs whose logs keep per-image validation losses are compared pairwise on
the held-out images they share, image by image and timestep by timestep, with a 95% bootstrap
interval (lora/analysis/paired.py); the best run is the one that beats every other with an
interval below 0, and "not distinguishable" is a valid answer. Older logs fall back to the
lowest final validation loss (means, possibly over different images), then to the guide's
improvement %, each with a note saying how weak that signal is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from lora.analysis.metrics import RunAnalysis
from lora.analysis.paired import PairedComparison, paired_compare, pick_best

NOISY_NOTE = ("training loss with random timesteps is noisy (the guide's runs moved about ±4%); "
              "log validation loss for a reliable comparison")


@dataclass(frozen=True)
class Comparison:
    """A table of runs and the best one, with how it was chosen."""

    analyses: tuple[RunAnalysis, ...]
    rows: tuple[dict[str, Any], ...]
    best: str | None
    best_by: str  # "paired" | "validation" | "improvement" | "none"
    note: str
    pairs: tuple[PairedComparison, ...] = ()

    @property
    def best_by_validation(self) -> str | None:
        """The run with the lowest final validation loss, when every run logged one."""
        return self.best if self.best_by in ("paired", "validation") else None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "best": self.best, "best_by": self.best_by,
                "best_by_validation": self.best_by_validation, "note": self.note,
                "pairs": [p.to_dict() for p in self.pairs]}

    def pair_lines(self) -> list[str]:
        """One sentence per paired comparison (each run vs its base model, then run vs run)."""
        lines = []
        for analysis in self.analyses:
            vs_base = analysis.vs_base
            if vs_base is not None and vs_base.ok:
                lines.append(vs_base.sentence())
        return lines + [p.sentence() for p in self.pairs]

    def to_markdown(self) -> str:
        text = table_markdown(self.rows)
        lines = self.pair_lines()
        if lines:
            text += "\n\nPaired on shared held-out images (difference = first minus second; " \
                    "below 0: the first has the lower loss):\n\n" + "\n".join(f"- {line}" for line in lines)
        return text + f"\n\n**Best:** {self.best or '-'} ({self.note})\n"


COLUMNS = (
    ("run", "run"),
    ("epochs", "epochs"),
    ("initial_loss", "initial"),
    ("min_loss", "min"),
    ("min_epoch", "min epoch"),
    ("final_loss", "final"),
    ("improvement_pct", "improvement % (guide)"),
    ("spikes", "spikes"),
    ("val_final_loss", "val final"),
    ("val_improvement_pct", "val improvement %"),
    ("trend", "trend"),
)


def run_row(analysis: RunAnalysis) -> dict[str, Any]:
    """One table row of the figures the guide compared."""
    val = analysis.validation
    return {
        "run": analysis.name,
        "epochs": len(analysis.losses),
        "initial_loss": analysis.initial_loss,
        "min_loss": analysis.min_loss,
        "min_epoch": analysis.min_epoch,
        "final_loss": analysis.final_loss,
        "improvement_pct": analysis.improvement_pct,
        "spikes": ", ".join(f"+{s.jump_pct:.0f}%@{s.epoch}" for s in analysis.spikes) or "-",
        "val_final_loss": val.final_loss if val else None,
        "val_improvement_pct": val.improvement_pct if val else None,
        "trend": analysis.training.trend if val is None else f"{analysis.training.trend} "
                                                              f"(val {val.trend})",
    }


def fmt(value: Any, key: str = "") -> str:
    """Numbers as a reader wants them: losses to 5 significant digits, percentages signed."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        if key.endswith("pct"):
            return f"{value:+.1f}"
        return f"{value:.5g}"
    return str(value)


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[fmt(row.get(key), key) for key, _ in COLUMNS] for row in rows]


def table_text(rows: Sequence[dict[str, Any]]) -> str:
    """A plain aligned table for the terminal."""
    header = [title for _, title in COLUMNS]
    body = table_rows(rows)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    header = [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


def compare_runs(analyses: Sequence[RunAnalysis]) -> Comparison:
    """Rank runs: by final validation loss when all have it, else by improvement %."""
    analyses = tuple(analyses)
    if not analyses:
        raise ValueError("compare_runs needs at least one run analysis")
    rows = tuple(run_row(a) for a in analyses)
    bases = {a.name: a.settings.get("base_model") for a in analyses if a.settings.get("base_model")}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{name}: {model}" for name, model in bases.items())
        return Comparison(analyses, rows, None, "none",
                          f"different base models ({listed}): their losses are not comparable")
    pairs = tuple(paired_compare(a.final_scores, b.final_scores)
                  for i, a in enumerate(analyses) for b in analyses[i + 1:])
    if len(analyses) > 1 and all(p.ok for p in pairs):
        best_name = pick_best([a.name for a in analyses], pairs)
        if best_name is not None:
            note = ("lower validation loss than every other run on their shared held-out images, "
                    "95% interval below 0")
        else:
            note = ("not distinguishable: no run is lower than every other with a 95% interval "
                    "that excludes 0")
        return Comparison(analyses, rows, best_name, "paired", note, pairs)
    unpaired = [p for p in pairs if not p.ok]
    with_val = [a for a in analyses if a.validation is not None
                and math.isfinite(a.validation.final_loss)]
    if len(with_val) == len(analyses):
        best = min(with_val, key=lambda a: a.validation.final_loss)  # type: ignore[union-attr]
        note = (f"lowest final validation loss ({best.validation.final_loss:.5g}); "  # type: ignore[union-attr]
                "validation uses fixed timesteps and noise")
        if unpaired:
            note += f"; not paired: {unpaired[0].message}"
        return Comparison(analyses, rows, best.name, "validation", note, pairs)
    finite = [a for a in analyses if math.isfinite(a.improvement_pct)]
    if not finite:
        return Comparison(analyses, rows, None, "none", "no run has a finite loss")
    best = max(finite, key=lambda a: a.improvement_pct)
    have = {id(a) for a in with_val}
    missing = ", ".join(a.name for a in analyses if id(a) not in have)
    note = (f"highest training-loss improvement ({best.improvement_pct:+.1f}%); no validation "
            f"loss for {missing}: {NOISY_NOTE}")
    return Comparison(analyses, rows, best.name, "improvement", note, pairs)
