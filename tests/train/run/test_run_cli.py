"""`animelora train` exit codes and messages: 0 complete, 3 stopped early, 2 bad input."""
from __future__ import annotations

import json

from animelora.cli import main


def _base(dataset, run_dir, *extra):
    return ["train", "--dataset", str(dataset), "--run-dir", str(run_dir), "--model", "tiny",
            "--max-steps", "4", "-q", *extra]


def test_bad_config_exits_2_with_one_line(tmp_path, dataset, capsys):
    assert main(_base(dataset, tmp_path / "r", "--lr", "-1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: invalid training config: learning_rate: must be > 0"
    assert main(_base(dataset, tmp_path / "r", "--set", "flip")) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(_base(dataset, tmp_path / "r", "--preset", "phase9")) == 2
    assert "valid presets: phase1.5, phase2a, phase2a-l2, phase2b" in capsys.readouterr().err
    assert main(_base(tmp_path / "missing", tmp_path / "r")) == 2
    assert "no such data-set folder" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_stopped_early_exits_3_and_rerun_completes_with_0(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(_base(dataset, run, "--stop-at-step", "2", "--set", "lr_scheduler=\"cosine\"",
                      "--set", "validation_timesteps=[500]")) == 3
    out = capsys.readouterr().out
    assert "stopped at step 2/4 (step-target); re-run without --stop-at-step, or with a later step" in out
    assert main(_base(dataset, run, "--set", "lr_scheduler=cosine", "--set", "validation_timesteps=[500]",
                      "--time-budget-minutes", "0.0001")) == 3
    assert "(time-budget)" in capsys.readouterr().out
    assert main(_base(dataset, run, "--set", "lr_scheduler=cosine", "--set", "validation_timesteps=[500]")) == 0
    out = capsys.readouterr().out
    assert "run complete at step 4/4" in out and "run.safetensors" in out
    log = json.loads((run / "training_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4]
    assert list(log["validation"][-1]["per_timestep"]) == ["500"]
    # another learning rate in the same run folder: refused, exit 2, field named
    assert main(_base(dataset, run, "--lr", "0.01", "--set", "lr_scheduler=cosine")) == 2
    assert "learning_rate" in capsys.readouterr().err
