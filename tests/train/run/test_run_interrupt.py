"""Ctrl-C / SIGTERM during `animelora train`: the step is finished, a checkpoint and the log are
written, the process exits 3 within seconds, and re-running the command ends bit-identical to
an uninterrupted run (CPU). A second signal exits at once (130 / 143).

The interrupted run is a real `python -m animelora train` process that gets a real signal.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12
PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parents[2]


def _cmd(dataset: Path, run_dir: Path) -> list[str]:
    # seeded augmentations and a warm-up, so a resume that restored anything wrongly would show;
    # step checkpoints every 2 steps only to know from outside that training is under way
    return [PYTHON, "-m", "animelora", "train", "--dataset", str(dataset), "--run-dir", str(run_dir),
            "--preset", "phase2b", "--model", "tiny", "--max-steps", str(STEPS), "--batch-size", "2",
            "--checkpoint-every-steps", "2", "--lr", "1e-3", "-q",
            "--set", "warmup_steps=3", "--set", "flip=true", "--set", "caption_shuffle=true",
            "--set", "noise_offset=0.05", "--set", "min_snr_gamma=5"]


def _done_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "checkpoint.json").exists())


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("the trainer ended (or never got there) before it could be signalled")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> Path:
    """The same command line, run once without interruption (in this process, same threads)."""
    from animelora.cli import main

    run_dir = tmp_path_factory.mktemp("interrupt-reference") / "reference"
    assert main(_cmd(dataset, run_dir)[3:]) == 0
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_exits_3_and_the_rerun_is_bit_identical(tmp_path, dataset, cli_env, reference,
                                                                          sig):
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(_cmd(dataset, run_dir), env=cli_env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: any(s >= 2 for s in _done_steps(run_dir)), proc)  # a few steps are logged
        signalled = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err[-2000:]
    assert took < 15, f"took {took:.1f} s to stop"
    match = re.fullmatch(r"interrupted at step (\d+)/12: checkpoint saved, re-run the same command to continue",
                         out.strip())
    assert match, out
    reached = int(match.group(1))
    assert 2 <= reached < STEPS
    assert f"{signal.Signals(sig).name} received" in err  # the one line the trainer logs
    assert "Traceback" not in err
    # the checkpoint is at the step reached and the log holds every step up to it, once
    assert max(_done_steps(run_dir)) == reached
    log = json.loads((run_dir / "training_log.json").read_text())
    assert log["global_step"] == reached and log["complete"] is False
    assert [s["step"] for s in log["steps"]] == list(range(1, reached + 1))

    rerun = subprocess.run(_cmd(dataset, run_dir), env=cli_env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a = load_file(str(reference / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = json.loads((reference / "training_log.json").read_text())
    log_b = json.loads((run_dir / "training_log.json").read_text())
    assert [s["loss"] for s in log_b["steps"]] == [s["loss"] for s in log_a["steps"]]
    assert log_b["complete"] is True and log_b["global_step"] == STEPS


_WAITER = """
import sys, time
from lora.train.run.interrupt import StopSignals
signals = StopSignals()
with signals.installed():
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)
sys.exit(0)
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_exits_at_once(cli_env, sig, code):
    """Real signals to a process inside the handlers ``train`` installs: the first only asks to
    stop, the second (a moment later) ends the process at once with 128 + the signal number."""
    proc = subprocess.Popen([PYTHON, "-c", _WAITER], env=cli_env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        time.sleep(1.0)
        assert proc.poll() is None  # the first signal only asked for a stop
        proc.send_signal(sig)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code
    err = proc.stderr.read()
    assert "stopping at once, without a checkpoint" in err


def test_handlers_are_put_back_and_only_installed_in_the_main_thread():
    import threading

    from lora.train.run.interrupt import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals = StopSignals()
    with signals.installed():
        assert signal.getsignal(signal.SIGINT) == signals._on_signal
        assert signal.getsignal(signal.SIGTERM) == signals._on_signal
    assert {s: signal.getsignal(s) for s in before} == before
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_installed_in_thread()))
    worker.start()
    worker.join()
    assert seen == [False] and {s: signal.getsignal(s) for s in before} == before


def _installed_in_thread() -> bool:
    from lora.train.run.interrupt import StopSignals

    signals = StopSignals()
    with signals.installed():
        return signal.getsignal(signal.SIGINT) == signals._on_signal
