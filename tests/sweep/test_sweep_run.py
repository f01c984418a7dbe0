"""A sweep on the tiny model: the clearly worse recipe stops at the first rung, the best is
named with its interval, and a sweep killed mid-way resumes to the same ranking without
training a finished rung again.

The grid is four learning rates on the tiny random-weight model, where 1e-9 barely moves the
LoRA from zero: after one epoch it is far above the others on the held-out images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from animelora.cli import main
from lora.analysis.plots import is_animelora_png
from lora.owned import NotOursError
from lora.runpaths import RunPaths
from lora.sweep import PLOT_FILE, SweepSpec, build_spec, run_sweep, train_in_process, validation_series
from lora.sweep.report import write_report
from lora.sweep.state import COMPLETE, PRUNED, open_state

from .conftest import make_workspace

GRID = ["--grid", "learning_rate=1e-9,0.03,0.05,0.08"]
SETTINGS = ["--set", "epochs=2", "--set", "batch_size=4", "--set", "checkpoint_every_minutes=60",
            "--compare-at", "1"]
BAD = "lr1e-09"


def _cli(ws: Path, *extra: str) -> list[str]:
    return ["-q", "sweep", "--dataset", str(ws / "datasets" / "demo"), "--name", "lrs", "--model", "tiny",
            *GRID, *SETTINGS, *extra]


def _segments(run_dir: Path) -> int:
    return len(RunPaths(run_dir).read_log().get("segments") or [])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One whole sweep through the command line; yields (workspace, its --json output)."""
    ws = make_workspace(tmp_path_factory.mktemp("sweep-whole"))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(_cli(ws, "--json"))
    assert code == 0, out.getvalue()
    return ws, json.loads(out.getvalue())


def test_the_clearly_worse_recipe_is_pruned_at_the_first_rung_and_the_best_named(finished):
    ws, result = finished
    state = json.loads((ws / "sweeps" / "lrs" / "state.json").read_text())
    by_name = {c["name"]: c for c in state["candidates"]}
    assert by_name[BAD]["status"] == PRUNED and by_name[BAD]["stopped_at_rung"] == 0
    assert "clearly worse than" in by_name[BAD]["reason"]
    # its run stopped at the end of epoch 1 (6 steps of 12), resumable, no LoRA files
    bad_run = RunPaths(ws / "runs" / f"lrs-{BAD}")
    assert bad_run.global_step() == 6 and not bad_run.lora_files()
    assert result["best"] and result["best"] != BAD
    best_run = RunPaths(ws / "runs" / f"lrs-{result['best']}")
    assert best_run.is_complete() and best_run.global_step() == 12
    assert [r["candidate"] for r in result["ranking"]][-1] == BAD
    assert result["gpu_time"]["saved_s"] > 0
    report = (ws / "sweeps" / "lrs" / "report.md").read_text()
    assert f"**Best:** {result['best']}" in report
    assert "95% interval" in report and "pruning saved about" in report
    assert f"| {BAD} | learning_rate=1e-09 | pruned (rung 1) |" in report


def test_the_plot_shows_each_candidate_per_rung_the_pruned_ending_where_they_stopped(finished):
    ws, result = finished
    folder = ws / "sweeps" / "lrs"
    assert is_animelora_png(folder / PLOT_FILE) and result["plot"] == str(folder / PLOT_FILE)
    assert f"]({PLOT_FILE})" in (folder / "report.md").read_text()
    state = json.loads((folder / "state.json").read_text())
    series = validation_series(open_state(ws, SweepSpec.from_dict(state["spec"])))
    assert [rung for rung, _ in series[BAD]] == [0]  # pruned at the first rung: one point
    assert [rung for rung, _ in series[result["best"]]] == [0, 1]
    final = {r["candidate"]: r["mean"] for r in result["ranking"]}
    assert series[result["best"]][-1][1] == pytest.approx(final[result["best"]])


def test_a_file_put_where_the_plot_goes_stops_the_report_and_stays(finished, tmp_path):
    ws, _ = finished
    copy = tmp_path / "ws"
    shutil.copytree(ws / "sweeps", copy / "sweeps")
    theirs = copy / "sweeps" / "lrs" / PLOT_FILE
    theirs.write_bytes(b"my own picture")
    spec = SweepSpec.from_dict(json.loads((copy / "sweeps" / "lrs" / "state.json").read_text())["spec"])
    with pytest.raises(NotOursError, match="was not written by animelora"):
        write_report(open_state(copy, spec))
    assert theirs.read_bytes() == b"my own picture"


def test_a_sweep_killed_mid_rung_resumes_to_the_same_ranking_without_retraining(finished, tmp_path):
    _, whole = finished
    ws = make_workspace(tmp_path)
    base = {"model": "tiny", "dataset": str(ws / "datasets" / "demo"), "dataset_version": "v0001",
            "epochs": 2, "batch_size": 4, "checkpoint_every_minutes": 60}
    spec = build_spec("lrs", base=base, grid={"learning_rate": [1e-9, 0.03, 0.05, 0.08]}, rungs=[1])

    def killed_in_second_rung(jobs):
        if jobs[0].rung == 1:  # the worker is lost after the first survivor trained to the end
            train_in_process(jobs[:1])
            raise RuntimeError("worker lost")
        return train_in_process(jobs)

    with pytest.raises(RuntimeError, match="worker lost"):
        run_sweep(spec, ws, train_many=killed_in_second_rung)
    trained: list[tuple[str, int]] = []

    def counting(jobs):
        trained.extend((j.candidate, j.rung) for j in jobs)
        return train_in_process(jobs)

    result = run_sweep(spec, ws, train_many=counting)
    assert result.status == "complete"
    assert all(rung == 1 for _, rung in trained)  # the first rung was not trained again
    assert BAD not in {c for c, _ in trained}  # nor the pruned candidate
    assert result.ranking == [r["candidate"] for r in whole["ranking"]]
    assert result.best == whole["best"]
    assert result.state.candidates[BAD].status == PRUNED
    for cand in result.state.candidates.values():
        # one training segment per rung trained: the survivor that finished before the kill
        # was not trained again, and no candidate pruned at the first rung trained further
        assert _segments(Path(cand.run_dir)) == (1 if cand.status == PRUNED else 2)
        assert cand.status in (PRUNED, COMPLETE)


def test_stop_after_rungs_exits_3_and_the_same_command_continues(tmp_path, capsys):
    ws = make_workspace(tmp_path)
    assert main(_cli(ws, "--stop-after", "1")) == 3
    out = capsys.readouterr().out
    assert "stopped after 1 of 2 rungs" in out
    report = (ws / "sweeps" / "lrs" / "report.md").read_text()
    assert "In progress" in report and "pruned (rung 1)" in report
    assert main(_cli(ws)) == 0
    assert "complete: best" in capsys.readouterr().out


def test_a_sweep_killed_after_a_candidate_reached_the_rung_records_it_without_training(tmp_path):
    """Killed mid-rung after the first candidate trained to the rung's stop step: that training
    is on disk but not in the state. The resumed sweep records it from the run folder, its
    training time included, rather than hand it to a training (a model load, a worker) again."""
    ws = make_workspace(tmp_path)
    base = {"model": "tiny", "dataset": str(ws / "datasets" / "demo"), "dataset_version": "v0001",
            "epochs": 2, "batch_size": 4, "checkpoint_every_minutes": 60}
    spec = build_spec("lrs", base=base, grid={"learning_rate": [1e-9, 0.05]}, rungs=[1])

    def killed_in_first_rung(jobs):
        train_in_process(jobs[:1])  # the bad recipe reaches epoch 1, then the worker is lost
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_sweep(spec, ws, train_many=killed_in_first_rung)
    trained: list[tuple[str, int]] = []

    def counting(jobs):
        trained.extend((j.candidate, j.rung) for j in jobs)
        return train_in_process(jobs)

    result = run_sweep(spec, ws, train_many=counting)
    assert result.status == "complete" and result.best == "lr0.05"
    assert trained == [("lr0.05", 0), ("lr0.05", 1)]
    bad = result.state.candidates[BAD]
    assert bad.status == PRUNED and _segments(Path(bad.run_dir)) == 1
    assert bad.rungs["0"]["reached"] and bad.rungs["0"]["step"] == 6
    assert bad.rungs["0"]["train_s"] > 0  # its time is read back from its segment records
