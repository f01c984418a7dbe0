"""Loss-curve PNGs with matplotlib's Agg backend (no display needed, safe in workers).

Files are written to a temporary name in the target folder and renamed, so a reader never sees
half a PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from lora.analysis.metrics import RunAnalysis, analyze_log  # noqa: E402
from lora.fsutil import atomic_write  # noqa: E402


def _as_analysis(item: RunAnalysis | Mapping[str, Any] | Path | str) -> RunAnalysis:
    return item if isinstance(item, RunAnalysis) else analyze_log(item)


def _validation_x(analysis: RunAnalysis) -> list[float]:
    """Validation points on the epoch axis; several evaluations in one epoch spread across it."""
    epochs = [p.get("epoch") for p in analysis.validation_points]
    counts: dict[int, int] = {}
    for e in epochs:
        if e is not None:
            counts[e] = counts.get(e, 0) + 1
    seen: dict[int, int] = {}
    xs = []
    for i, e in enumerate(epochs):
        if e is None:
            xs.append(float(i + 1))
            continue
        seen[e] = seen.get(e, 0) + 1
        xs.append(e - 1 + seen[e] / counts[e])
    return xs


#: The PNG text chunk that proves a plot is animelora's (lora/owned.py: a file the user names
#: is only ever replaced when the project wrote it).
PNG_SIGNATURE = {"Software": "animelora"}


def is_animelora_png(path: Path | str) -> bool:
    """Whether ``path`` is a PNG this module wrote (it carries :data:`PNG_SIGNATURE`)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}) or {}
            return img.format == "PNG" and all(text.get(k) == v for k, v in PNG_SIGNATURE.items())
    except Exception:  # noqa: BLE001 - not an image, unreadable: not ours
        return False


def save_figure(fig: Figure, out_png: Path | str) -> Path:
    """Render ``fig`` to PNG atomically (temporary file in the same folder, then rename).

    The PNG carries :data:`PNG_SIGNATURE`, so a later command can tell it from a user's image.
    """
    def render(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100, bbox_inches="tight", metadata=dict(PNG_SIGNATURE))

    return atomic_write(Path(out_png), render, fsync=False)  # no fsync: plots are rebuilt at will


def plot_loss(analysis_or_log: RunAnalysis | Mapping[str, Any] | Path | str,
              out_png: Path | str) -> Path:
    """Training loss (raw and smoothed), spikes marked, and validation loss when logged."""
    analysis = _as_analysis(analysis_or_log)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    train = analysis.training
    x = list(train.epochs)
    ax.plot(x, train.values, "o-", color="tab:blue", alpha=0.45, lw=1, ms=4,
            label="training loss (epoch mean)")
    ax.plot(x, train.smoothed, "-", color="tab:blue", lw=2.2, label="training, smoothed (EMA)")
    if train.min_epoch is not None:
        ax.plot([train.min_epoch], [train.min_loss], "*", color="tab:green", ms=13,
                label=f"minimum (epoch {train.min_epoch})")
    for spike in train.spikes:
        ax.annotate(f"+{spike.jump_pct:.0f}%", (spike.epoch, spike.loss), color="tab:red",
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax.plot([spike.epoch], [spike.loss], "o", color="tab:red", ms=7)
    if analysis.validation is not None:
        vx = _validation_x(analysis)[: len(analysis.validation.values)]
        ax.plot(vx, analysis.validation.values, "s--", color="tab:orange", lw=1.6, ms=4,
                label="validation loss (fixed timesteps)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{analysis.name}: {analysis.improvement_pct:+.1f}% "
                 f"({analysis.training.trend})", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, out_png)


def plot_comparison(items: Sequence[RunAnalysis | Mapping[str, Any] | Path | str],
                    out_png: Path | str) -> Path:
    """Several runs on one chart: training (smoothed, raw faint) and validation when any."""
    analyses = [_as_analysis(i) for i in items]
    if not analyses:
        raise ValueError("plot_comparison needs at least one run")
    has_val = any(a.validation is not None for a in analyses)
    fig = Figure(figsize=(12 if has_val else 8, 4.5))
    ax = fig.add_subplot(1, 2 if has_val else 1, 1)
    vax = fig.add_subplot(1, 2, 2) if has_val else None
    colors = matplotlib.colormaps["tab10"].colors
    for i, analysis in enumerate(analyses):
        color = colors[i % len(colors)]
        t = analysis.training
        ax.plot(t.epochs, t.values, "o", color=color, alpha=0.35, ms=3)
        ax.plot(t.epochs, t.smoothed, "-", color=color, lw=2,
                label=f"{analysis.name} ({analysis.improvement_pct:+.1f}%)")
        if vax is not None and analysis.validation is not None:
            vax.plot(_validation_x(analysis)[: len(analysis.validation.values)],
                     analysis.validation.values, "s--", color=color, ms=4,
                     label=f"{analysis.name} ({analysis.validation.improvement_pct:+.1f}%)")
    ax.set_title("training loss (smoothed; dots: epoch means)", fontsize=11)
    for axis in (ax, vax):
        if axis is not None:
            axis.set_xlabel("epoch")
            axis.set_ylabel("loss")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
    if vax is not None:
        vax.set_title("validation loss", fontsize=11)
    return save_figure(fig, out_png)
