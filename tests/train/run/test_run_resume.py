"""Exact resume: a run killed with SIGKILL at arbitrary points and re-run ends bit-identical.

The interrupted run is a real `python -m animelora train` process, killed and started again;
the reference is the same command line run once, uninterrupted, with the same thread count.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


STEPS = 12
PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parents[2]


def _cmd(dataset: Path, run_dir: Path) -> list[str]:
    # flip + caption shuffle + noise offset + min-SNR + cosine warm-up + accumulation:
    # every seeded part of a step is exercised.
    return [PYTHON, "-m", "animelora", "train", "--dataset", str(dataset), "--run-dir", str(run_dir),
            "--preset", "phase2b", "--model", "tiny", "--max-steps", str(STEPS), "--batch-size", "2",
            "--checkpoint-every-steps", "2", "--lr", "1e-3", "-q",
            "--set", "warmup_steps=3", "--set", "flip=true", "--set", "caption_shuffle=true",
            "--set", "noise_offset=0.05", "--set", "min_snr_gamma=5", "--set", "lora_dropout=0.1",
            "--set", "keep_checkpoints=2"]


def _done_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "checkpoint.json").exists())


def _kill_after_checkpoint(cmd, env, run_dir: Path, beyond: int, delay: float) -> int:
    """Start the trainer, wait for a checkpoint newer than ``beyond``, SIGKILL it after ``delay``."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(s > beyond for s in _done_steps(run_dir)):
                break
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return max(_done_steps(run_dir), default=0)


def test_sigkill_and_rerun_give_bit_identical_lora(tmp_path, dataset, cli_env):
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    from animelora.cli import main

    # the reference runs in this process (same thread count as the subprocesses)
    assert main(_cmd(dataset, ref_dir)[3:]) == 0

    rng = random.Random(3)
    reached = 0
    kills = 0
    while kills < 2 and reached < STEPS - 4:  # two kills, each after a newer checkpoint
        reached = _kill_after_checkpoint(_cmd(dataset, killed_dir), cli_env, killed_dir, reached,
                                         rng.uniform(0.0, 0.15))
        kills += 1
    assert 0 < reached < STEPS and kills >= 1
    final = subprocess.run(_cmd(dataset, killed_dir), env=cli_env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]

    for name in ("pytorch_lora_weights.safetensors", "killed.safetensors"):
        other = "reference.safetensors" if name == "killed.safetensors" else name
        a = load_file(str(ref_dir / "lora" / other))
        b = load_file(str(killed_dir / "lora" / name))
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), key
    log_a = json.loads((ref_dir / "training_log.json").read_text())
    log_b = json.loads((killed_dir / "training_log.json").read_text())
    assert [s["step"] for s in log_b["steps"]] == list(range(1, STEPS + 1))
    assert [s["loss"] for s in log_a["steps"]] == [s["loss"] for s in log_b["steps"]]
    assert log_a["validation"][-1] == log_b["validation"][-1]
    assert log_b["complete"] is True and log_b["global_step"] == STEPS
    # keep_checkpoints=2: only the newest two survive
    assert len(_done_steps(killed_dir)) == 2
