"""The run folder keeps what a user has: configs, locks, finished runs, older configs, bad limits.

Each case is the `animelora train` command line (in-process, so no model load is paid twice)
or, for the lock, a real second process holding the run folder's lock.
"""
from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys

import pytest

from animelora.cli import main


def _base(dataset, run_dir, *extra, steps: int = 4):
    return ["train", "--dataset", str(dataset), "--run-dir", str(run_dir), "--model", "tiny",
            "--max-steps", str(steps), "-q", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("flag, value, message", [
    ("--time-budget-minutes", "-1", "--time-budget-minutes must be > 0, got -1"),
    ("--time-budget-minutes", "0", "--time-budget-minutes must be > 0, got 0"),
    ("--time-budget-minutes", "nan", "--time-budget-minutes must be > 0, got nan"),
    ("--stop-at-step", "-3", "--stop-at-step must be >= 1, got -3"),
    ("--stop-at-step", "0", "--stop-at-step must be >= 1, got 0"),
])
def test_segment_limits_that_can_never_progress_exit_2(tmp_path, dataset, capsys, flag, value, message):
    assert main(_base(dataset, tmp_path / "r", flag, value)) == 2
    assert _one_error_line(capsys) == f"error: {message}"
    assert not (tmp_path / "r").exists()


def test_segment_limits_are_checked_by_the_library_too(tmp_path, tiny_cfg):
    from lora.config import ConfigError
    from lora.train import train

    with pytest.raises(ConfigError, match="stop_at_step must be >= 1"):
        train(tiny_cfg(), tmp_path / "r", stop_at_step=0)
    with pytest.raises(ConfigError, match="time_budget_s must be > 0"):
        train(tiny_cfg(), tmp_path / "r", time_budget_s=-60)


def test_serve_limit_is_checked(capsys):
    assert main(["serve", "--limit", "0"]) == 2
    assert _one_error_line(capsys) == "error: --limit must be >= 1, got 0"


def test_run_folder_that_is_a_file_exits_2(tmp_path, dataset, capsys):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("my notes\n")
    assert main(_base(dataset, not_a_folder)) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert not_a_folder.read_text() == "my notes\n"
    assert main(_base(dataset, not_a_folder / "inside")) == 2
    assert "cannot create run folder" in _one_error_line(capsys)


def test_failed_first_attempt_does_not_pin_the_config(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    # a wrong --model (the last --model wins): fails before any step
    assert main(_base(dataset, run, "--model", str(tmp_path / "no-such-model"), "--stop-at-step", "1")) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # the corrected model in the same run folder trains (the old code refused: "a different config")
    assert main(_base(dataset, run, "--stop-at-step", "1")) == 3
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"] == "tiny" and config["schema_version"] >= 2
    # once a step is checkpointed the config is pinned
    assert main(_base(dataset, run, "--lr", "0.01")) == 2
    assert "learning_rate" in _one_error_line(capsys)


def test_second_trainer_is_kept_out_and_a_killed_one_does_not_block(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from filelock import FileLock; "
         f"lock = FileLock({str(run / '.lock')!r}); lock.acquire(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_base(dataset, run, "--stop-at-step", "1")) == 2
        line = _one_error_line(capsys)
        assert "in use by another trainer" in line and str(run) in line
        assert not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock is gone with its process: the next trainer runs
    assert main(_base(dataset, run, "--stop-at-step", "1")) == 3


def test_finished_run_is_extended_only_when_asked(tmp_path, dataset, capsys, umask_022):
    run = tmp_path / "run"
    assert main(_base(dataset, run)) == 0
    capsys.readouterr()
    # every file and folder of the run follows the umask (LoRA files, checkpoints, config, log)
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")
             if p.name != ".lock"}
    assert "lora/run.safetensors" in modes and "checkpoints/step-4/trainable.safetensors" in modes
    assert {k: oct(m) for k, m in modes.items() if (run / k).is_file() and m != 0o644} == {}
    assert {m for k, m in modes.items() if (run / k).is_dir()} == {0o755}, modes
    lora_dir = run / "lora"
    before = {p.name: p.read_bytes() for p in lora_dir.iterdir()}
    assert len(before) == 2

    # a larger --max-steps on a finished run: refused, nothing trained, LoRA files untouched
    assert main(_base(dataset, run, steps=6)) == 2
    line = _one_error_line(capsys)
    assert "finished at step 4" in line and "--extend" in line
    assert {p.name: p.read_bytes() for p in lora_dir.iterdir()} == before
    assert json.loads((run / "training_log.json").read_text())["global_step"] == 4

    # a smaller one: one clear line, not "run complete at step 4/2"
    assert main(_base(dataset, run, steps=2)) == 2
    captured = capsys.readouterr()
    assert "4/2" not in captured.out
    assert "finished at step 4, more than the 2 steps asked for" in captured.err

    # the same --max-steps again: complete, nothing to do
    assert main(_base(dataset, run)) == 0
    assert "run complete at step 4/4" in capsys.readouterr().out

    # --extend continues from the final checkpoint; the step-4 files are kept
    assert main(_base(dataset, run, "--extend", steps=6)) == 0
    assert "run complete at step 6/6" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (run / "lora-step-4").iterdir()} == before
    after = {p.name: p.read_bytes() for p in lora_dir.iterdir()}
    assert after.keys() == before.keys() and after != before
    log = json.loads((run / "training_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4, 5, 6] and log["complete"] is True


def test_shorter_max_steps_than_an_unfinished_run_has_done_exits_2(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(_base(dataset, run, "--stop-at-step", "3", steps=6)) == 3
    capsys.readouterr()
    assert main(_base(dataset, run, steps=2)) == 2
    assert "already at step 3, beyond the 2 steps asked for" in _one_error_line(capsys)
    assert not (run / "lora").exists()


def test_config_written_by_an_older_version_resumes(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(_base(dataset, run, "--stop-at-step", "2")) == 3
    capsys.readouterr()
    path = run / "config.json"
    data = json.loads(path.read_text())
    # as an older version wrote it: no schema version, without a field added since
    del data["schema_version"]
    del data["config"]["keep_tokens"]
    path.write_text(json.dumps(data))
    assert main(_base(dataset, run)) == 0, capsys.readouterr().err
    assert "run complete at step 4/4" in capsys.readouterr().out
    upgraded = json.loads(path.read_text())
    assert upgraded["schema_version"] >= 2 and upgraded["config"]["keep_tokens"] == 1


def test_missing_field_takes_the_value_of_the_old_behaviour(tmp_path, tiny_cfg, monkeypatch):
    from lora.train.run import runfolder

    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)  # the run has started
    old = tiny_cfg().model_dump(mode="json")
    old["run_name"] = "run"
    del old["noise_offset"]
    (run / "config.json").write_text(json.dumps({"config": old}))
    # an (imagined) field whose new default differs from what older versions did
    monkeypatch.setitem(runfolder.LEGACY_VALUES, "noise_offset", 0.05)
    assert runfolder.pin_config(tiny_cfg(), run).noise_offset == 0.05
    # asking for another value than the run was started with is still a different config
    with pytest.raises(runfolder.ConfigError, match="noise_offset"):
        runfolder.pin_config(tiny_cfg(noise_offset=0.2), run)
    # a config from a newer version is not guessed at
    (run / "config.json").write_text(json.dumps({"schema_version": 99, "config": old}))
    with pytest.raises(runfolder.RunFolderError, match="newer animelora"):
        runfolder.pin_config(tiny_cfg(), run)


def test_stop_at_step_exits_3_only_while_re_running_makes_progress(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(_base(dataset, run, "--stop-at-step", "2")) == 3
    assert "stopped at step 2/4 (step-target); re-run without --stop-at-step" in capsys.readouterr().out
    # the same command again: already there, nothing to train -> not "stopped early" (was 3, forever)
    for stop in ("2", "1"):
        assert main(_base(dataset, run, "--stop-at-step", stop)) == 2
        line = _one_error_line(capsys)
        assert "already at step 2 of 4, at or past --stop-at-step" in line and "leave it out" in line
    assert main(_base(dataset, run, "--stop-at-step", "3")) == 3
    capsys.readouterr()
    assert main(_base(dataset, run)) == 0
    assert "run complete at step 4/4" in capsys.readouterr().out
