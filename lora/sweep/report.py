"""The sweep's report: ``<workspace>/sweeps/<name>/report.md`` and the rows of its table.

One table, candidate by rung: the mean validation loss on the held-out images at each rung,
the paired difference against that rung's best with its 95% interval, the status (pruned at
which rung, failed, complete), and the training time; then the best, the "not distinguishable"
groups and the GPU time spent and saved by pruning. The Prefect flow shows the same rows as a
table artifact (flows/sweep.py), so the file and the UI cannot disagree. Beside it, the same
validation losses as a plot (lora/sweep/plot.py), linked from the report; the flow embeds it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora.fsutil import atomic_write_text

if TYPE_CHECKING:
    from lora.sweep.state import SweepState


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _pair_cell(pair: dict[str, Any] | None, is_best: bool) -> str:
    if is_best:
        return "best"
    if not pair:
        return "-"
    if pair.get("status") != "ok":
        return str(pair.get("status"))
    word = {"a better": "lower", "b better": "higher"}.get(pair["verdict"], "not distinguishable")
    return f"{pair['diff_pct']:+.2f}% [{pair['low_pct']:+.2f}%, {pair['high_pct']:+.2f}%] {word}"


def report_rows(state: "SweepState") -> list[dict[str, str]]:
    """One row per candidate: settings, status, each rung's mean loss and the paired difference
    against the rung's best (95% interval), training time."""
    titles = state.spec.rung_titles()
    bests = {d["rung"]: d.get("best") for d in state.decisions}
    order = [r["candidate"] for r in (state.result or {}).get("ranking", [])] or list(state.candidates)
    rows = []
    for name in order:
        cand = state.candidates[name]
        settings = state.spec.candidate(name).overrides
        row = {"candidate": name,
               "settings": ", ".join(f"{k}={v}" for k, v in settings.items()) or "-",
               "status": cand.status + (f" (rung {cand.stopped_at_rung + 1})"
                                        if cand.stopped_at_rung is not None else "")}
        for i, title in enumerate(titles):
            record = cand.rungs.get(str(i))
            if record is None or record.get("mean") is None:
                row[title] = "-"
                continue
            vs = _pair_cell(record.get("vs_best"), bests.get(i) == name)
            row[title] = f"{record['mean']:.5g} ({vs})"
        row["training time"] = _hms(cand.train_s)
        rows.append(row)
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no candidates)"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h].replace("|", "/") for h in header) + " |" for r in rows]
    return "\n".join(lines)


def _best_lines(state: "SweepState") -> list[str]:
    result = state.result
    if not result:
        done, total = state.rungs_done(), len(state.spec.rungs) + 1
        return [f"**In progress:** {done} of {total} rungs done; run the sweep again to continue."]
    best = result.get("best")
    if not best:
        return ["**Best:** none (no candidate has per-image validation losses to compare)."]
    groups = result.get("groups") or []
    first = next((g for g in groups if best in g), [best])
    if result.get("best_distinguishable"):
        verdict = "lower validation loss than every other finished candidate, each 95% interval below 0"
    elif len(first) > 1:
        verdict = ("lowest mean, but not distinguishable from " + ", ".join(n for n in first if n != best)
                   + " (their 95% intervals hold 0)")
    else:
        verdict = "lowest mean validation loss"
    lines = [f"**Best:** {best} ({verdict}); run folder `{result.get('best_run_dir')}`."]
    if groups:
        lines += ["", "Not distinguishable groups (finished candidates, lowest loss first):", ""]
        lines += [f"{i + 1}. {', '.join(g)}" for i, g in enumerate(groups)]
    return lines


def _plot_lines(state: "SweepState") -> list[str]:
    from lora.sweep.plot import PLOT_FILE

    if not (state.root / PLOT_FILE).is_file():
        return []
    return [f"![validation loss per candidate and rung]({PLOT_FILE})", ""]


def render_report(state: "SweepState") -> str:
    spec = state.spec
    base = ", ".join(f"{k}={v}" for k, v in spec.base.items() if k != "dataset") or "-"
    lines = [f"# Sweep {spec.name}", "",
             f"Preset {spec.preset}; data set `{spec.base.get('dataset', '-')}`; settings shared by every "
             f"candidate: {base}. Rungs: " + ", ".join(state.spec.rung_titles()) + ".", "",
             "Each cell: mean validation loss on the data set's held-out images at the rung, and in "
             "brackets the paired difference against that rung's best with its 95% interval (image "
             "by image and timestep by timestep; below 0 = lower loss). A candidate whose whole "
             "interval is above 0 is clearly worse and stops at that rung.", "",
             _table(report_rows(state)), "", *_plot_lines(state), *_best_lines(state)]
    pruned = [c for c in state.candidates.values() if c.reason]
    if pruned:
        lines += ["", "Stopped early:", ""] + [f"- {c.name}: {c.reason}" for c in pruned]
    spent = sum(c.train_s for c in state.candidates.values())
    saved = ((state.result or {}).get("gpu_time") or {}).get("saved_s")
    lines += ["", f"GPU time: {_hms(spent)} of training spent"
              + (f"; pruning saved about {_hms(saved)} (each pruned candidate's remaining steps at the "
                 "rate it trained, set-up left out)" if saved else "") + "."]
    return "\n".join(lines) + "\n"


def write_report(state: "SweepState") -> None:
    """Write the plot, then ``report.md`` that links it, each atomically. The sweep folder is the
    sweep's own (lora/sweep/state.py), but a plot is replaced only when it is one animelora drew:
    a file put there under its name stops the sweep with one line and stays as it is."""
    from lora.analysis.plots import is_animelora_png
    from lora.owned import check_output_file
    from lora.sweep.plot import PLOT_FILE, plot_validation

    plot = check_output_file(state.root / PLOT_FILE, suffixes=(".png",), ours=is_animelora_png,
                             what="the sweep's validation plot")
    plot_validation(state, plot)
    atomic_write_text(state.report_path, render_report(state))
