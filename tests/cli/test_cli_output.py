"""What the CLI prints: --version, help for every flag, the training progress bar and start
line, -q silencing third-party noise, and --json objects a script can read."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from animelora.cli import build_parser, main, package_version
from animelora.commands.progress import TrainProgress, format_duration
from animelora.commands.train import describe_schedule

ROOT = Path(__file__).resolve().parents[2]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"animelora {package_version()}"


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    missing = [f"animelora {a.option_strings}" for a in parser._actions
               if a.option_strings and not (a.help and a.help.strip())]
    for name, sub in _subcommands(parser).items():
        missing += [f"animelora {name} {a.option_strings or a.dest}" for a in sub._actions
                    if a.help is not argparse.SUPPRESS and not (a.help and a.help.strip())]
    assert not missing, missing


def test_fetch_help_default_url_is_the_real_default():
    from animelora.commands.data import _BOORU_URL_HELP
    from lora.data.refresh import DEFAULT_BOORU_URL

    assert _BOORU_URL_HELP == DEFAULT_BOORU_URL


def test_limit_and_max_steps_say_how_they_behave(capsys):
    for argv in (["fetch", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "download candidates" in text and "--target-size" in text
    assert "min(--max-steps, epochs x steps per epoch)" in text


def test_start_line_says_whether_max_steps_or_epochs_end_the_run():
    plan = SimpleNamespace(train_items=[0] * 11, version="v0001", steps_per_epoch=3, total_steps=5)
    capped = describe_schedule(SimpleNamespace(max_steps=5, epochs=20), plan, "demo")
    assert "5 steps: --max-steps 5 ends the run before 20 epochs (60 steps)" in capped
    plan.total_steps = 60
    beyond = describe_schedule(SimpleNamespace(max_steps=500, epochs=20), plan, "demo")
    assert "60 steps = 20 epochs; --max-steps 500 is more than that and is not reached" in beyond
    plain = describe_schedule(SimpleNamespace(max_steps=None, epochs=20), plan, "demo")
    assert plain.endswith("60 steps = 20 epochs")


def test_progress_bar_shows_rate_loss_validation_and_a_moving_eta():
    now = [0.0]
    stream = io.StringIO()
    progress = TrainProgress(stream, interactive=True, window=4, clock=lambda: now[0])
    try:
        for step in range(1, 11):
            # step 1 ends after a slow start (model load, caches); then 2 s per step
            now[0] = 30.0 if step == 1 else 30.0 + 2.0 * (step - 1)
            progress({"step": step, "total_steps": 20, "epoch": 1 + step // 7, "loss": 0.5 / step,
                      "lr": 1e-4, "eta_s": 999.0, "images_per_sec": 2.0})
            if step == 6:
                logging.getLogger("lora.train.validation").info(
                    "validation loss", extra={"validation_loss": 0.1234})
        assert progress.steps_per_second() == pytest.approx(0.5)
        assert progress.eta_seconds() == pytest.approx(20.0)  # 10 steps left at 2 s, not 30 s ones
        text = progress.postfix()
        assert text == "2.0 img/s, loss 0.0500, val 0.1234, eta 0:20"
    finally:
        progress.close()
    drawn = stream.getvalue()
    assert "10/20" in drawn and "val 0.1234" in drawn and "eta 0:20" in drawn and "\r" in drawn
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?"


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    with TrainProgress(stream, interactive=False, line_every=5) as progress:
        for step in range(1, 8):
            progress({"step": step, "total_steps": 7, "epoch": 1, "loss": 0.25,
                      "images_per_sec": 4.0})
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/7", "5/7", "7/7"]
    assert "\r" not in stream.getvalue() and "eta 0:00" in lines[-1]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    from lora.testing.datasets import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("cli") / "ds", 6, [(64, 64)])


def _train(tmp_path: Path, dataset: Path, before: list[str], after: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("ANIMELORA_FAKE_OOM_AT_STEP", None)
    return subprocess.run([sys.executable, "-m", "animelora", *before, "train", "--dataset",
                           str(dataset), "--run-dir", str(tmp_path / "run"), "--model", "tiny",
                           "--max-steps", "2", *after],
                          env=env, capture_output=True, text=True, timeout=600)


def test_quiet_json_train_is_one_object_and_no_noise(tmp_path, small_dataset):
    done = _train(tmp_path, small_dataset, ["-q"], ["--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(done.stdout)
    assert payload["status"] == "complete" and payload["global_step"] == 2
    assert [Path(p).name for p in payload["lora_files"]] == ["pytorch_lora_weights.safetensors",
                                                             "run.safetensors"]
    # nothing from transformers/diffusers (weight-loading bars, advisories), no info lines
    assert done.stderr.strip() == "", done.stderr[-2000:]


def test_train_start_line_and_progress_without_q(tmp_path, small_dataset):
    done = _train(tmp_path, small_dataset, [], ["--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["status"] == "complete"  # stdout holds only the object
    err = done.stderr
    assert "--max-steps 2 ends the run before 20 epochs" in err
    assert "step 2/2" in err and "img/s" in err and "val " in err and "eta " in err
