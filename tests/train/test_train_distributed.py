"""Several processes (torchrun, as `accelerate launch` starts them) train what one process trains.

Real `python -m animelora train` processes in a gloo process group on CPU: each process takes
its share of every micro-batch, gradients and loss are summed between processes, only the
main process writes. The result must match a one-process run of the same config, a segmented
two-process run must resume from its checkpoint, and that checkpoint must resume in one process.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora.train.distributed import rank_share

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def test_rank_share_splits_every_item_once():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            shares = [rank_share(n, r, world) for r in range(world)]
            covered = [i for a, b in shares for i in range(a, b)]
            assert covered == list(range(n))
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(dataset: Path, run_dir: Path, env: dict, processes: int, stop_at: int | None = None) -> None:
    # batch 3 over two processes splits 2 + 1; accumulation 2; the buckets' short last batches
    # leave one process without images in some micro-batches; flip is drawn per step
    args = ["-m", "animelora", "train", "--dataset", str(dataset), "--run-dir", str(run_dir),
            "--model", "tiny", "--max-steps", str(STEPS), "--batch-size", "3", "--lr", "1e-3",
            "--checkpoint-every-steps", "2", "-q", "--set", "gradient_accumulation=2", "--set", "flip=true"]
    if stop_at is not None:
        args += ["--stop-at-step", str(stop_at)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + args
    else:
        cmd = [sys.executable] + args
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout[-2000:] + proc.stderr[-3000:]
    if stop_at is None:
        assert proc.returncode == 0, output
    elif processes == 1:
        assert proc.returncode == 3, output  # the CLI's exit status for "stopped at a step target"
    else:  # torchrun reports a child's non-zero status as its own failure (and stops the rest)
        assert proc.returncode != 0 and "exitcode  : 3" in output, output


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def _losses(run_dir: Path) -> list[float]:
    return [s["loss"] for s in json.loads((run_dir / "training_log.json").read_text())["steps"]]


def _grad_norms(run_dir: Path) -> list[float]:
    # AdamW hides a gradient's scale; the logged norm shows a sum that is not the step's mean
    return [s["grad_norm"] for s in json.loads((run_dir / "training_log.json").read_text())["steps"]]


def _assert_same_training(a: Path, b: Path) -> None:
    wa, wb = _lora(a), _lora(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        # the same sums in another order: AdamW divides by sqrt(v), so rounding in tiny gradients
        # grows (4e-5 of a tensor's norm here); a wrong share or a lost image is far larger
        rel = ((wa[key] - wb[key]).norm() / wa[key].norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, (key, rel)
    assert any(wa[k].abs().max() > 0 for k in wa if "lora_B" in k or "lora.up" in k)  # it trained
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)
    assert _grad_norms(a) == pytest.approx(_grad_norms(b), rel=1e-4)


def test_two_processes_train_like_one_and_resume_across_process_counts(tmp_path, dataset, cli_env):
    one, two, resumed_in_one = tmp_path / "one", tmp_path / "two", tmp_path / "two-then-one"
    _train(dataset, one, cli_env, processes=1)

    # two processes, in two segments (the second resumes from the first's checkpoint)
    _train(dataset, two, cli_env, processes=2, stop_at=4)
    first_segment = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert first_segment[-1] == "step-4"
    # the main process alone wrote: the same checkpoint files as a one-process run
    assert sorted(p.name for p in (two / "checkpoints" / "step-4").iterdir()) == \
        sorted(p.name for p in (one / "checkpoints" / "step-4").iterdir())
    _train(dataset, two, cli_env, processes=2)
    log = json.loads((two / "training_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, STEPS + 1)) and log["complete"]
    _assert_same_training(one, two)

    # a two-process checkpoint resumes in one process
    _train(dataset, resumed_in_one, cli_env, processes=2, stop_at=4)
    _train(dataset, resumed_in_one, cli_env, processes=1)
    _assert_same_training(one, resumed_in_one)


def test_launched_segment_repeats_a_config_error_as_one(tmp_path, tiny_cfg):
    """A Prefect worker launches segments through run_segment_processes: a bad data set comes
    back as a ConfigError naming it (not retried), not as torchrun's generic failure."""
    from lora.config import ConfigError
    from lora.train.launch import run_segment_processes

    cfg = tiny_cfg(dataset=str(tmp_path / "no-such-dataset"))
    with pytest.raises(ConfigError, match="no-such-dataset"):
        run_segment_processes(cfg, tmp_path / "run", 2, stop_at_step=2)
    assert not list((tmp_path / "run").glob(".segment-*"))
