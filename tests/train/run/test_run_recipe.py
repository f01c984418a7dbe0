"""Checkpoints record the recipe that trained them: a run never resumes under settings that
change what is trained, whatever happened to its config.json, and what it exports states the
settings its weights were trained with."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from animelora.cli import main


def _args(dataset, run, *extra):
    return ["train", "--dataset", str(dataset), "--run-dir", str(run), "--model", "tiny", "--max-steps", "4",
            "--lr", "0.0002", "--seed", "5", "-q", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture()
def started(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(_args(dataset, run, "--stop-at-step", "2")) == 3
    capsys.readouterr()
    recipe = json.loads((run / "checkpoints" / "step-2" / "recipe.json").read_text())
    assert recipe["learning_rate"] == 0.0002 and recipe["seed"] == 5 and "speed" not in recipe
    return run


@pytest.mark.parametrize("what_happened", ["deleted", "moved away", "replaced"])
def test_a_run_never_resumes_under_another_recipe_whatever_happened_to_config_json(started, dataset, capsys,
                                                                                  what_happened):
    config = started / "config.json"
    if what_happened == "deleted":
        config.unlink()
    elif what_happened == "moved away":
        config.rename(started.parent / "config.json.bak")
    else:
        config.write_text(config.read_text().replace("0.0002", "0.01").replace('"seed": 5', '"seed": 9'))
    assert main(_args(dataset, started, "--lr", "0.01", "--seed", "9")) == 2
    line = _one_error_line(capsys)
    assert "holds checkpoints trained with other settings" in line
    assert "learning_rate (0.0002 -> 0.01)" in line and "seed (5 -> 9)" in line
    # nothing was trained or rewritten under the new settings; the old ones resume and finish
    assert sorted(p.name for p in (started / "checkpoints").iterdir()) == ["step-2"]
    if what_happened == "replaced":
        config.unlink()
    assert main(_args(dataset, started)) == 0
    assert json.loads(config.read_text())["config"]["learning_rate"] == 0.0002
    with safe_open(str(started / "lora" / "run.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_learning_rate"], meta["ss_seed"]) == ("0.0002", "5")  # what the weights were trained with


def test_another_rank_is_refused_by_name_also_for_a_checkpoint_without_a_recipe(started, dataset, capsys):
    (started / "config.json").unlink()
    assert main(_args(dataset, started, "--set", "lora_rank=8")) == 2
    assert "lora_rank (16 -> 8)" in _one_error_line(capsys)
    # a checkpoint written before recipes were recorded: its training log still names the rank
    folder = started / "checkpoints" / "step-2"
    (folder / "recipe.json").unlink()
    manifest = json.loads((folder / "checkpoint.json").read_text())
    del manifest["files"]["recipe.json"]
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    assert main(_args(dataset, started, "--set", "lora_rank=8")) == 2
    line = _one_error_line(capsys)
    assert "lora_rank (16 -> 8)" in line and "size of tensor" not in line


def test_an_unreadable_config_json_says_what_each_way_out_does(started, dataset, capsys):
    (started / "config.json").write_text("{not json")
    assert main(_args(dataset, started, "--lr", "0.01")) == 2
    line = _one_error_line(capsys)
    assert "unreadable run config" in line and "move it away to start over" not in line
    assert "to resume this run, delete the file" in line and "to start a new run, use another --run-dir" in line
    (started / "config.json").unlink()  # doing what it says: the checkpoints resume, under their own recipe
    assert main(_args(dataset, started, "--lr", "0.01")) == 2
    assert "learning_rate (0.0002 -> 0.01)" in _one_error_line(capsys)
    assert main(_args(dataset, started)) == 0
