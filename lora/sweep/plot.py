"""The sweep's plot: each candidate's held-out validation loss at each rung, one line per candidate.

What a reader should see at a glance: which recipes were stopped early and where (their line
ends at the rung that pruned them, with a cross), how far apart the rest are, and which one won
(drawn thick, with a star). The numbers are the ones in report.md's table (each rung's mean
validation loss on the data set's held-out images), so the picture and the table cannot disagree.
The PNG sits beside report.md in the sweep folder, signed by :func:`lora.analysis.plots.save_figure`
so the write policy (lora/owned.py) can tell it from a file someone put there.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora.sweep.state import SweepState

#: The plot's file name in ``<workspace>/sweeps/<name>/`` (report.md links it by this name).
PLOT_FILE = "validation_loss.png"


def validation_series(state: "SweepState") -> dict[str, list[tuple[int, float]]]:
    """Per candidate, (rung index, mean validation loss) for every rung it was judged at: a
    pruned or failed candidate's series ends at the last rung it reached."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, cand in state.candidates.items():
        points = [(int(rung), float(rec["mean"])) for rung, rec in cand.rungs.items()
                  if rec.get("mean") is not None]
        if points:
            out[name] = sorted(points)
    return out


def shown_best(state: "SweepState") -> str | None:
    """The sweep's best when it is finished, else the best of the latest rung judged so far."""
    if state.result:
        return state.result.get("best")
    return state.decisions[-1].get("best") if state.decisions else None


def plot_validation(state: "SweepState", out_png: Path | str) -> Path | None:
    """Draw :func:`validation_series` to ``out_png``; None (nothing written) before any rung."""
    series = validation_series(state)
    if not series:
        return None
    import matplotlib

    from lora.analysis.plots import Figure, save_figure
    from lora.sweep.state import FAILED, PRUNED

    titles = state.spec.rung_titles()
    best = shown_best(state)
    fig = Figure(figsize=(max(6.0, 1.6 * len(titles) + 3), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colors = matplotlib.colormaps["tab10"].colors
    ranked = [r["candidate"] for r in (state.result or {}).get("ranking", [])]
    order = [n for n in ranked if n in series] + [n for n in series if n not in ranked]
    for i, name in enumerate(order):
        cand, color = state.candidates[name], colors[i % len(colors)]
        xs, ys = [p[0] for p in series[name]], [p[1] for p in series[name]]
        is_best = name == best
        stopped = cand.status in (PRUNED, FAILED)
        label = name + (" (best)" if is_best else f" ({cand.status})" if stopped else "")
        ax.plot(xs, ys, "-o", color=color, lw=3.2 if is_best else 1.4, alpha=1.0 if is_best else 0.8,
                ms=5, label=label, zorder=3 if is_best else 2)
        if is_best:
            ax.plot(xs[-1:], ys[-1:], "*", color=color, ms=18, zorder=4)
        elif stopped:
            ax.plot(xs[-1:], ys[-1:], "x", color=color, ms=12, mew=3, zorder=4)
    ax.set_xticks(range(len(titles)))
    ax.set_xticklabels(titles)
    ax.set_xlim(-0.3, len(titles) - 0.7)
    ax.set_xlabel("rung")
    ax.set_ylabel("mean validation loss (held-out images)")
    ax.set_title(f"sweep {state.spec.name}: lower is better; x = stopped there", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, out_png)
