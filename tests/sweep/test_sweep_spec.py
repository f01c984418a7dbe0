"""What a sweep trains is checked before anything trains, and a sweep never trains into a
folder it did not make or alongside another process running it."""
from __future__ import annotations

from pathlib import Path

import pytest

from animelora.cli import main
from lora.sweep import build_spec, parse_candidate, parse_grid_axis
from lora.sweep.spec import SweepSpecError, default_rungs
from lora.sweep.state import sweep_lock


def _args(ws: Path, *extra: str) -> list[str]:
    return ["sweep", "--dataset", str(ws / "datasets" / "demo"), "--name", "s", "--model", "tiny",
            *extra]


def test_a_grid_is_every_combination_with_readable_names():
    spec = build_spec("s", base={"model": "tiny"},
                      grid={"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]})
    assert [c.name for c in spec.candidates] == ["lr0.0001-r8", "lr0.0001-r16", "lr5e-05-r8", "lr5e-05-r16"]
    assert spec.config(spec.candidates[1]).lora_rank == 16
    assert spec.config(spec.candidates[1]).run_name == "s-lr0.0001-r16"
    # phase2a's 20 epochs: compare after 5 and 10, then at the end
    assert spec.rungs == (5, 10) == default_rungs(20)


def test_command_line_values_parse_as_settings():
    assert parse_grid_axis("learning-rate=1e-4,5e-5") == ("learning_rate", [1e-4, 5e-5])
    assert parse_candidate("lr_scheduler=cosine warmup_steps=100;name=cos") == {
        "lr_scheduler": "cosine", "warmup_steps": 100, "name": "cos"}


@pytest.mark.parametrize("grid, message", [
    ({"lora_rank": [0, 8]}, "lora_rank: must be > 0"),
    ({"learning_rate": [1e-4]}, "at least 2 candidates"),
    ({"model": ["tiny", "other"]}, "the sweep's setting"),
])
def test_an_impossible_candidate_is_refused_before_any_training(grid, message):
    with pytest.raises(SweepSpecError, match=message):
        build_spec("s", base={"model": "tiny"}, grid=grid)


def test_cli_refuses_a_bad_candidate_with_one_line_and_writes_nothing(workspace, capsys):
    code = main(_args(workspace, "--grid", "lr=1e-4,5e-5"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown setting 'lr'" in err and "learning_rate" in err
    assert not (workspace / "sweeps").exists() and not (workspace / "runs").exists()


def test_cli_refuses_a_run_folder_that_is_not_the_sweeps(workspace, capsys):
    theirs = workspace / "runs" / "s-lr0.0001"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    code = main(_args(workspace, "--grid", "learning_rate=1e-4,5e-5"))
    err = capsys.readouterr().err
    assert code == 2 and "already exists and is not this sweep's" in err
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    assert not (workspace / "runs" / "s-lr5e-05").exists()


def test_a_sweep_running_in_another_process_is_refused(workspace, capsys):
    with sweep_lock(workspace, "s"):
        code = main(_args(workspace, "--grid", "learning_rate=1e-4,5e-5"))
    assert code == 2 and "running in another process" in capsys.readouterr().err
    assert not (workspace / "runs").exists()


def test_a_resumed_sweep_with_other_candidates_is_refused(workspace, capsys):
    # a sweep started before (its state written) with other learning rates
    from lora.sweep.state import open_state

    spec = build_spec("s", base={"model": "tiny", "dataset": str(workspace / "datasets" / "demo"),
                                 "dataset_version": "v0001"},
                      grid={"learning_rate": [1e-4, 5e-5]})
    open_state(workspace, spec)
    code = main(_args(workspace, "--grid", "learning_rate=1e-4,2e-5"))
    assert code == 2 and "was started with other candidates" in capsys.readouterr().err


def test_the_readme_spec_file_builds_five_candidates(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    toml = readme.split("# sweep.toml: the flags add to it\n", 1)[1].split("```", 1)[0]
    (tmp_path / "sweep.toml").write_text(toml)
    from lora.sweep import read_spec_file

    data = read_spec_file(tmp_path / "sweep.toml")
    spec = build_spec("lr-rank", preset=data["preset"], base={**data["base"], "model": "tiny"},
                      grid=data["grid"], candidates=data["candidates"], rungs=data["rungs"])
    assert [c.name for c in spec.candidates] == [
        "lr0.0001-r8", "lr0.0001-r16", "lr5e-05-r8", "lr5e-05-r16", "cosine"]
    assert spec.rungs == (5, 10) and spec.config(spec.candidate("cosine")).warmup_steps == 500
