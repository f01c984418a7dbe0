"""`report/` of a run folder: metrics.json, loss_curve.png and a readable report.md."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lora.analysis.compare import Comparison, fmt
from lora.analysis.metrics import RunAnalysis
from lora.analysis.plots import plot_comparison, plot_loss
from lora.fsutil import atomic_write_text
from lora.owned import FolderKind, build_folder
from lora.runpaths import COMPARISON_PLOT, LADDER_PLOT, LOSS_PLOT, METRICS_FILE, REPORT_FILE, RunPaths

#: ``report/``: rebuilt whole by every report; ``legacy``: what it held before it had a ledger.
REPORT_FOLDER = FolderKind("the run's report folder", legacy=(
    METRICS_FILE, REPORT_FILE, LOSS_PLOT, COMPARISON_PLOT, LADDER_PLOT))

def json_safe(value: Any) -> Any:
    """NaN and infinity become null so the JSON is valid for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temporary file in the same folder, then rename over ``path`` (no fsync:
    a report is rebuilt from the log at any time)."""
    return atomic_write_text(path, text, fsync=False)


def metrics_markdown(analysis: RunAnalysis) -> str:
    """The metrics table shared by report.md and the model card."""
    rows = [
        ("initial loss", fmt(analysis.initial_loss)),
        ("minimum loss", f"{fmt(analysis.min_loss)} (epoch {analysis.min_epoch})"),
        ("final loss", fmt(analysis.final_loss)),
        ("improvement (the guide's metric, training loss)", f"{fmt(analysis.improvement_pct, 'pct')}%"),
        ("spikes", ", ".join(f"+{s.jump_pct:.1f}% at epoch {s.epoch}" for s in analysis.spikes)
         or "none"),
        ("epochs logged", str(len(analysis.losses))),
    ]
    val = analysis.validation
    if val is not None:
        rows += [
            ("validation initial", fmt(val.initial_loss)),
            ("validation minimum", f"{fmt(val.min_loss)} (epoch {val.min_epoch})"),
            ("validation final", fmt(val.final_loss)),
            ("validation improvement", f"{fmt(val.improvement_pct, 'pct')}%"),
            ("validation noise (±)", f"{val.noise_pct:.3g}% ({val.noise_source})"),
        ]
        vs_base = analysis.vs_base
        if vs_base is not None:
            rows.append(("validation vs base model (step 0)", vs_base.figure()))
        if val.per_timestep_final:
            rows.append(("validation final per timestep", ", ".join(
                f"t={t}: {fmt(v)}" for t, v in val.per_timestep_final.items())))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_report(
    run_dir: Path | str, analysis: RunAnalysis, comparison: Comparison | None = None,
    *, gate: dict[str, Any] | None = None, ladder: Any = None,
) -> Path:
    """Write ``report/metrics.json``, ``report/loss_curve.png`` and ``report/report.md``.

    ``gate``: the paired comparison the publish gate decides on (lora/gate.py);
    ``ladder``: the guide's ladder of runs on this data set (lora/analysis/ladder.py).
    Returns the path of ``report.md``. The folder is rebuilt whole and swapped in (lora/owned.py):
    it is replaced only while it holds nothing but an earlier report's unchanged files, so a
    note the user put there, or a report.md they edited, stops it with one line instead.
    """
    paths = RunPaths(run_dir)
    with build_folder(paths.report, REPORT_FOLDER) as tmp:
        _write_report_files(tmp, paths, analysis, comparison, gate, ladder)
    return paths.report_md


def _write_report_files(out: Path, paths: RunPaths, analysis: RunAnalysis, comparison: Comparison | None,
                        gate: dict[str, Any] | None, ladder: Any) -> None:
    """The report's files, written into ``out`` (the folder that becomes ``paths.report``)."""
    metrics: dict[str, Any] = analysis.to_dict()
    if comparison is not None:
        metrics["comparison"] = comparison.to_dict()
    if gate is not None:
        metrics["gate_comparison"] = gate
    if ladder is not None:
        metrics["ladder"] = ladder.to_dict()
    write_text_atomic(out / paths.metrics.name, json.dumps(json_safe(metrics), indent=2) + "\n")
    plot_loss(analysis, out / paths.loss_plot.name)

    parts = [f"# Training report: {analysis.name}", "", f"**Verdict:** {analysis.verdict}", ""]
    settings = {k: v for k, v in analysis.settings.items() if v is not None}
    if settings:
        parts += ["## Settings", "", "| setting | value |", "|---|---|"]
        parts += [f"| {k} | {v} |" for k, v in settings.items()]
        parts.append("")
    if gate is not None:
        parts += [f"**Validation loss vs the {gate.get('against')}:** {gate.get('text')}", ""]
    parts += ["## Metrics", "", metrics_markdown(analysis), "", "## Per-epoch loss", "",
              "| epoch | loss | smoothed | time (s) |", "|---|---|---|---|"]
    for row, smooth in zip(analysis.losses, analysis.training.smoothed):
        parts.append(f"| {row['epoch']} | {fmt(row['loss'])} | {fmt(smooth)} | "
                     f"{fmt(row.get('time_seconds'))} |")
    parts += ["", "## Loss curve", "", f"![loss curve]({paths.loss_plot.name})", ""]
    if comparison is not None:
        plot_comparison(list(comparison.analyses), out / paths.comparison_plot.name)
        parts += ["## Comparison", "", comparison.to_markdown(), "",
                  f"![comparison]({paths.comparison_plot.name})", ""]
    parts += _training_samples_section(out, paths)
    if ladder is not None and ladder.rungs:
        from lora.analysis.ladder import plot_ladder

        plot_ladder(ladder, out / paths.ladder_plot.name)
        parts += ["## The guide's ladder on this data set", "", ladder.to_markdown(), "",
                  f"![ladder]({paths.ladder_plot.name})", ""]
    write_text_atomic(out / paths.report_md.name, "\n".join(parts))


def _training_samples_section(out: Path, paths: RunPaths) -> list[str]:
    """The growing grid of the samples drawn while training (lora/train/samples.py), copied
    beside report.md so the report shows it wherever it is read; nothing before the first set."""
    grid = paths.training_samples_grid
    if not grid.is_file():
        return []
    (out / paths.report_training_samples.name).write_bytes(grid.read_bytes())
    steps = paths.training_sample_steps()
    return ["## Samples while training", "",
            f"Drawn after steps {', '.join(str(s) for s in steps)} with fixed prompts and seeds; rows are "
            "prompt and seed, one column per step (at most ten, evenly spread). Every set: "
            f"`{paths.training_samples.name}/`.", "",
            f"![samples while training]({paths.report_training_samples.name})", ""]


__all__ = ["json_safe", "metrics_markdown", "write_report", "write_text_atomic"]
