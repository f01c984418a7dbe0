"""Benchmark: a sweep of candidate recipes against training every candidate whole (issue 27).

Why: a sweep earns its place only if pruning saves more GPU time than its rungs (the extra
validations, a segment's set-up per rung) cost. This runs ``animelora sweep`` once, as a user
would, on Danbooru-shaped data (bench/e2e.py's images and random-weight SD1.5 model), then
reads each candidate's run folder and prints one table: the steps each candidate trained,
its training time, and what training it whole in one segment would have taken (one set-up
plus its measured time per step times all its steps). The bottom line: the sweep's wall time against
the sum of the candidates' whole runs, and the GPU time pruning saved.

Usage (GPU machine)::

    python bench/sweep.py [--epochs 20] [--images 650] [--shapes danbooru]
                          [--grid learning_rate=1e-4,5e-5,2e-5 --grid lora_rank=8,16]
                          [--compare-at 5,10] [--work DIR]

``--smoke`` runs it on the CPU with the tiny model (a test runs it). With ``$OUT`` set the
result is also written to ``$OUT/bench_sweep.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.e2e import SHAPES, build_data  # noqa: E402  (the repository root is on the path only now)

#: The default grid: 3 learning rates around the guide's 5e-5 x the guide's two ranks = 6 candidates.
DEFAULT_GRID = ["learning_rate=1e-4,5e-5,2e-5", "lora_rank=8,16"]
SWEEP_NAME = "bench"


def sweep_command(data: Path, model: Path, epochs: int, grid: list[str], compare_at: str | None,
                  smoke: bool) -> list[str]:
    """``animelora sweep`` as a user types it, with the benchmark's data set and model."""
    cmd = [sys.executable, "-m", "animelora", "sweep", "--dataset", str(data), "--name", SWEEP_NAME,
           "--model", str(model), "--set", f"epochs={epochs}", "--json", "-q"]
    for item in grid:
        cmd += ["--grid", item]
    if compare_at:
        cmd += ["--compare-at", compare_at]
    if smoke:
        cmd += ["--set", "resolution=64", "--set", "validation_count=4"]
    return cmd


def sweep_state_path(workspace: Path) -> Path:
    """The benchmark sweep's ``state.json`` (lora/sweep/state.py names it)."""
    from lora.sweep.state import STATE_FILE, sweep_dir

    return sweep_dir(workspace, SWEEP_NAME) / STATE_FILE


def whole_run_s(run_dir: Path, step: int, total: int) -> float | None:
    """What training this candidate whole in one segment would take: one segment's set-up plus
    its measured time per step (set-up excluded, validations included) times every step.

    Why not its training time: a sweep trains a candidate in one segment per rung, each with its
    own set-up, which one whole run pays once; counting them would flatter the sweep."""
    try:
        log = json.loads((run_dir / "training_log.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    segments = [s for s in log.get("segments") or [] if isinstance(s, dict) and s.get("wall_s")]
    if not segments or step <= 0:
        return None
    setups = [float(s.get("setup_s") or 0.0) for s in segments]
    busy = sum(float(s["wall_s"]) for s in segments) - sum(setups)
    return setups[0] + busy / step * total


def candidate_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Per candidate: status, steps trained of its total, training time in the sweep, and its
    whole-run time (:func:`whole_run_s`)."""
    rows = []
    for cand in state.get("candidates", []):
        rungs = [r for _, r in sorted((cand.get("rungs") or {}).items(), key=lambda kv: int(kv[0]))]
        reached = [r for r in rungs if r.get("step")]
        step = max((int(r["step"]) for r in reached), default=0)
        total = max((int(r.get("total_steps") or 0) for r in reached), default=0)
        train_s = sum(float(r.get("train_s") or 0.0) for r in rungs)
        whole = whole_run_s(Path(cand["run_dir"]), step, total)
        rows.append({"candidate": cand["name"], "status": cand.get("status"), "steps": step,
                     "total_steps": total, "train_s": round(train_s, 1),
                     "whole_s": round(whole if whole is not None else train_s, 1),
                     "mean": reached[-1].get("mean") if reached else None})
    return rows


def summary(rows: list[dict[str, Any]], sweep_wall: float, result: dict[str, Any]) -> dict[str, Any]:
    whole = sum(r["whole_s"] for r in rows)
    spent = sum(r["train_s"] for r in rows)
    return {"sweep_wall_s": round(sweep_wall, 1), "train_s": round(spent, 1), "all_whole_s": round(whole, 1),
            "saved_s": round(whole - spent, 1), "x_faster": round(whole / sweep_wall, 2) if sweep_wall else None,
            "best": result.get("best"), "best_distinguishable": result.get("best_distinguishable"),
            "sweep_saved_s": (result.get("gpu_time") or {}).get("saved_s")}


def print_table(rows: list[dict[str, Any]], total: dict[str, Any]) -> None:
    print("| candidate | status | steps | training s | whole run s | last mean loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mean = f"{r['mean']:.5g}" if isinstance(r["mean"], (int, float)) else "-"
        print(f"| {r['candidate']} | {r['status']} | {r['steps']}/{r['total_steps']} | {r['train_s']} | "
              f"{r['whole_s']} | {mean} |")
    print(f"\nsweep: {total['sweep_wall_s']} s wall, {total['train_s']} s of it training; every candidate "
          f"trained whole: {total['all_whole_s']} s ({total['saved_s']:+} s against the sweep's training; "
          f"the sweep's own estimate of what pruning saved: {total['sweep_saved_s']} s); whole / sweep wall: "
          f"x{total['x_faster']}; best {total['best']} (distinguishable: {total['best_distinguishable']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--images", type=int, default=650, help="training + held-out images")
    ap.add_argument("--shapes", default="danbooru", choices=sorted(SHAPES))
    ap.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                    help=f"a grid axis (repeatable; default {' '.join(DEFAULT_GRID)})")
    ap.add_argument("--compare-at", default=None, metavar="EPOCHS", help="rungs (default: the sweep's own)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, 24 images, 2 epochs, rung at 1")
    a = ap.parse_args(argv)
    grid = a.grid or (["learning_rate=1e-3,1e-9"] if a.smoke else DEFAULT_GRID)
    epochs = 2 if a.smoke else a.epochs
    compare_at = "1" if a.smoke and a.compare_at is None else a.compare_at

    from bench.train import build_random_sd15
    from lora.datapaths import DatasetPaths

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        model = work / "model"
        if not (model / "unet").is_dir():
            build_random_sd15(model, a.smoke)
        workspace = work / "ws"
        data = build_data(DatasetPaths.datasets_root(workspace), a.shapes, 24 if a.smoke else a.images)
        cmd = sweep_command(data, model, epochs, grid, compare_at, a.smoke)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(f"animelora sweep exited {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(proc.stdout)
        state = json.loads(sweep_state_path(workspace).read_text())
        rows = candidate_rows(state)
        total = summary(rows, wall, result)
        print_table(rows, total)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "bench_sweep.json").write_text(
                json.dumps({"epochs": epochs, "grid": grid, "rows": rows, "summary": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
