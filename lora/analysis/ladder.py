"""The guide's ladder: phase1.5 → phase2a → phase2a-l2 → phase2b on one data set.

Each rung asks "did this step help?": Phase 2A against Phase 1.5, Level 2 (the data set grown
300 → 600) against Phase 2A, Level 3 against Level 2. So a run compares, by default, with the
newest finished run of the rung before it on the same data-set folder (:func:`resolve_compare`),
and its report shows the whole ladder: each rung against its own base model (step 0) and
against the rung before, paired on shared held-out images with 95% intervals
(lora/analysis/paired.py). Rungs without a finished run are skipped; the next rung is then
compared with the nearest earlier rung that has one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora.analysis.paired import PairedComparison, paired_compare
from lora.runpaths import RunPaths

LADDER: tuple[str, ...] = ("phase1.5", "phase2a", "phase2a-l2", "phase2b")
PREVIOUS_RUNG: dict[str, str] = {LADDER[i + 1]: LADDER[i] for i in range(len(LADDER) - 1)}
#: ``compare_to`` value that means "the previous rung's run, when there is one".
AUTO = "auto"


@dataclass(frozen=True)
class RunRef:
    run_dir: Path
    preset: str | None
    dataset_dir: Path | None
    complete: bool
    finished_at: float


def read_run_ref(run_dir: Path) -> RunRef | None:
    """A run folder's preset, data set and completeness (None when it is not a run folder)."""
    paths = RunPaths(run_dir)
    config = paths.read_config()
    if config is None:
        return None
    cfg = config.get("config") or {}
    dataset = config.get("dataset_dir") or cfg.get("dataset")
    logged = paths.read_log()
    try:
        complete = bool(logged.get("complete")) if logged is not None else False
        finished = paths.log.stat().st_mtime if logged is not None else 0.0
    except OSError:
        complete, finished = False, 0.0
    return RunRef(run_dir, cfg.get("preset"), Path(dataset).resolve() if dataset else None, complete, finished)


def finished_runs(workspace: Path | str, dataset_dir: Path | str, preset: str,
                  exclude: Path | str | None = None) -> list[Path]:
    """Finished runs of ``preset`` on ``dataset_dir`` in ``<workspace>/runs``, newest first."""
    runs_root = RunPaths.runs_root(workspace)
    target = Path(dataset_dir).expanduser().resolve()
    skip = Path(exclude).expanduser().resolve() if exclude else None
    found = []
    for run_dir in sorted(runs_root.iterdir()) if runs_root.is_dir() else []:
        if not run_dir.is_dir() or run_dir.resolve() == skip:
            continue
        ref = read_run_ref(run_dir)
        if ref and ref.complete and ref.preset == preset and ref.dataset_dir == target:
            found.append(ref)
    return [r.run_dir for r in sorted(found, key=lambda r: r.finished_at, reverse=True)]


def previous_rung_run(workspace: Path | str, preset: str, dataset_dir: Path | str,
                      exclude: Path | str | None = None) -> Path | None:
    """The newest finished run of the rung before ``preset`` on the same data set, if any."""
    previous = PREVIOUS_RUNG.get(preset)
    if previous is None:
        return None
    runs = finished_runs(workspace, dataset_dir, previous, exclude)
    return runs[0] if runs else None


def resolve_compare(workspace: Path | str, compare_to: str | None, preset: str,
                    dataset_dir: Path | str, run_dir: Path | str) -> Path | None:
    """The run folder to compare with: ``"auto"`` = the previous rung's run (or none);
    empty/None/"none" = none; anything else names a run in ``<workspace>/runs``."""
    if compare_to is None or compare_to.strip().lower() in ("", "none"):
        return None
    if compare_to == AUTO:
        return previous_rung_run(workspace, preset, dataset_dir, exclude=run_dir)
    path = RunPaths.of(workspace, compare_to).root
    if not path.exists():
        raise FileNotFoundError(f"compare_to run {compare_to!r} not found in {path.parent}")
    return path


@dataclass(frozen=True)
class Rung:
    preset: str
    run: str
    run_dir: Path
    vs_base: PairedComparison | None
    previous: str | None
    vs_previous: PairedComparison | None

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "run": self.run, "run_dir": str(self.run_dir),
                "vs_base_model": self.vs_base.to_dict() if self.vs_base else None,
                "previous": self.previous,
                "vs_previous": self.vs_previous.to_dict() if self.vs_previous else None}


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[Rung, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"rungs": [r.to_dict() for r in self.rungs]}

    def to_markdown(self) -> str:
        def cell(pair: PairedComparison | None) -> str:
            if pair is None:
                return "-"
            if not pair.ok:
                return pair.status
            return f"{pair.diff_pct:+.2f}% [{pair.low_pct:+.2f}%, {pair.high_pct:+.2f}%] ({pair.verdict.replace('a better', 'lower').replace('b better', 'higher')})"

        lines = ["Validation loss difference, paired on shared held-out images, 95% interval "
                 "(below 0: this rung has the lower loss).", "",
                 "| rung | run | vs base model (step 0) | vs previous rung | previous run |",
                 "|---|---|---|---|---|"]
        for r in self.rungs:
            lines.append(f"| {r.preset} | {r.run} | {cell(r.vs_base)} | {cell(r.vs_previous)} | {r.previous or '-'} |")
        return "\n".join(lines)


def build_ladder(workspace: Path | str, run_dir: Path | str) -> Ladder:
    """The ladder up to the rung of ``run_dir``: the newest finished run of each earlier rung
    on the same data set, then ``run_dir`` itself."""
    from lora.analysis.log import LogError
    from lora.analysis.metrics import analyze_log

    run_dir = Path(run_dir).resolve()
    ref = read_run_ref(run_dir)
    if ref is None or ref.preset not in LADDER or ref.dataset_dir is None:
        return Ladder(())
    chosen: list[tuple[str, Path]] = []
    for preset in LADDER[: LADDER.index(ref.preset)]:
        runs = finished_runs(workspace, ref.dataset_dir, preset, exclude=run_dir)
        if runs:
            chosen.append((preset, runs[0]))
    chosen.append((ref.preset, run_dir))
    rungs: list[Rung] = []
    previous = None
    for preset, path in chosen:
        try:
            analysis = analyze_log(path, name=path.name)
        except LogError:
            continue
        vs_prev = paired_compare(analysis.final_scores, previous.final_scores) if previous else None
        rungs.append(Rung(preset, analysis.name, path, analysis.vs_base,
                          previous.name if previous else None, vs_prev))
        previous = analysis
    return Ladder(tuple(rungs))


def plot_ladder(ladder: Ladder, out_png: Path | str) -> Path:
    """One chart: each rung's difference vs its base model and vs the rung before, with the
    95% intervals as error bars (percent of the other side's loss)."""
    from lora.analysis.plots import Figure, save_figure

    fig = Figure(figsize=(max(6, 2.2 * len(ladder.rungs)), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    plotted = False
    for offset, key, label, color in ((-0.12, "vs_base", "vs base model (step 0)", "tab:blue"),
                                      (0.12, "vs_previous", "vs previous rung", "tab:orange")):
        xs, ys, lo, hi = [], [], [], []
        for i, rung in enumerate(ladder.rungs):
            pair = getattr(rung, key)
            if pair is not None and pair.ok:
                xs.append(i + offset)
                ys.append(pair.diff_pct)
                lo.append(pair.diff_pct - pair.low_pct)
                hi.append(pair.high_pct - pair.diff_pct)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=4, label=label)
            plotted = True
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(ladder.rungs)))
    ax.set_xticklabels([f"{r.preset}\n{r.run}" for r in ladder.rungs], fontsize=8)
    ax.set_ylabel("validation loss difference, % (95% interval)")
    ax.set_title("the guide's ladder: below 0 = lower validation loss", fontsize=11)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no paired figures (too few shared held-out images)", ha="center",
                transform=ax.transAxes, fontsize=9)
    return save_figure(fig, out_png)
