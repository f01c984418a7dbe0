"""What the CLI says is true and quiet means quiet (issue 24): start and progress lines of a
run, library noise, fetch/import progress off a terminal, --json on failure, --set names."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animelora.cli import main
from animelora.commands.progress import CountProgress, TrainProgress

ROOT = Path(__file__).resolve().parents[2]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "ANIMELORA_FAKE_OOM_AT_STEP"):
        env.pop(name, None)  # what an earlier in-process -q left in this environment
    return subprocess.run([sys.executable, "-m", "animelora", *argv], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished tiny run (2 steps), trained without -q off a terminal, and what it printed."""
    from lora.testing.datasets import write_synthetic_dataset

    root = tmp_path_factory.mktemp("truthful")
    dataset = write_synthetic_dataset(root / "ds", 6, [(64, 64)])
    run = root / "run"
    done = _cli("train", "--dataset", str(dataset), "--run-dir", str(run), "--model", "tiny",
                "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    return run, done


def test_the_last_progress_line_is_printed_once_with_the_final_validation():
    stream = io.StringIO()
    with TrainProgress(stream, interactive=False, line_every=10) as progress:
        for step in range(1, 21):
            progress({"step": step, "total_steps": 20, "epoch": 1, "loss": 0.25})
        logging.getLogger("lora.train.validation").info("validation", extra={"validation_loss": 0.5})
    finals = [line for line in stream.getvalue().splitlines() if line.startswith("step 20/20")]
    assert len(finals) == 1 and "val 0.5000" in finals[0]


def test_a_stopped_run_still_ends_with_its_last_step():
    stream = io.StringIO()
    with TrainProgress(stream, interactive=False, line_every=10) as progress:
        for step in range(1, 4):
            progress({"step": step, "total_steps": 20, "epoch": 1, "loss": 0.25})
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["1/20", "3/20"]


def test_train_without_q_prints_one_last_line_and_no_torchvision_warnings(trained):
    _, done = trained
    assert sum(line.startswith("step 2/2") for line in done.stderr.splitlines()) == 1, done.stderr
    assert "torchvision" not in done.stderr


def test_a_finished_run_run_again_prints_no_start_line(trained):
    run, first = trained
    assert "training run:" in first.stderr  # the first run did train
    again = _cli("train", "--dataset", str(run.parent / "ds"), "--run-dir", str(run), "--model",
                 "tiny", "--max-steps", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training run:" not in again.stderr and "step 2/2" not in again.stderr
    assert "run complete at step 2/2" in again.stdout


def test_quiet_after_the_command_silences_diffusers_loading_bars(trained):
    run, _ = trained
    done = _cli("analyze", "-q", "--rescore", "--device", "cpu", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "re-scored on" in done.stdout
    assert done.stderr == "", done.stderr[-2000:]  # no "Loading pipeline components" bar
    # re-scoring scores the same single held-out image: the advice is a larger data set, not
    # --rescore again
    assert "add images" in done.stdout and "with --rescore" not in done.stdout


def test_count_progress_off_a_terminal_prints_periodic_lines():
    now = [0.0]
    stream = io.StringIO()
    progress = CountProgress("downloading", stream=stream, interactive=False, every_s=10.0,
                             clock=lambda: now[0])
    for i in range(1, 41):
        now[0] = float(i)  # one image a second
        progress({"total": 40, "round": 1})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("downloading: 1/40 img (2%)")
    assert lines[-1].startswith("downloading: 40/40 img (100%)") and "eta 0:00" in lines[-1]
    assert 4 <= len(lines) <= 6  # every 10 s, not one per image
    assert "\r" not in stream.getvalue()


def test_import_off_a_terminal_shows_progress_lines(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(source / f"{i}.png")
    assert main(["import", "--from", str(source), "--workspace", str(tmp_path / "ws")]) == 0
    err = capsys.readouterr().err
    assert "importing: 3/3 img (100%)" in err


def test_json_failure_prints_one_object_with_the_error_and_exit_code(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["analyze", str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["status"] == "error" and payload["exit_code"] == 2
    assert str(missing) in payload["error"] and payload["error"] in captured.err


def test_json_usage_error_prints_one_object_too(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--json"])
    assert info.value.code == 2
    payload = json.loads(capsys.readouterr().out)
    assert payload["exit_code"] == 2 and "--dataset" in payload["error"]


def test_json_success_is_left_as_the_command_printed_it(tmp_path, capsys):
    log = tmp_path / "training_log.json"
    log.write_text(json.dumps({"losses": [{"epoch": 1, "loss": 0.2}, {"epoch": 2, "loss": 0.19}]}))
    assert main(["analyze", str(log), "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)


@pytest.mark.parametrize("given, meant", [("lr", "learning_rate"), ("rank", "lora_rank"),
                                          ("alpha", "lora_alpha"), ("batch", "batch_size"),
                                          ("epoch", "epochs"), ("learning_rat", "learning_rate")])
def test_unknown_set_names_suggest_the_setting(tmp_path, capsys, given, meant):
    (tmp_path / "ds").mkdir()
    code = main(["train", "--dataset", str(tmp_path / "ds"), "--run-dir", str(tmp_path / "runs" / "a"),
                 "--set", f"{given}=1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown setting {given!r}" in err
    assert f"did you mean {meant}" in err
