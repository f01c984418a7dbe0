"""Checkpoints on their own (no model): the typed round trip, damage, pruning, and a full disk.

The full disk is real: every file a checkpoint writes into its temporary folder is opened on
``/dev/full``, whose writes fail in the kernel with ENOSPC, as on a disk with no space left.
"""
from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import pytest
import torch

from lora.train import checkpoint as ckpt
from lora.train.checkpoint import CheckpointWriteError, RunState


def _write(root: Path, step: int, *, recipe: dict | None = None, loss_scale: dict | None = None) -> Path:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3) * step
    return ckpt.write_checkpoint(
        root, step, trainable={"unet.a.lora_A.weight": weight},
        optimizer={"state": {0: {"exp_avg": weight.clone()}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        scheduler={"last_epoch": step}, run=RunState(global_step=step, epoch=2, step_in_epoch=1),
        loss_scale=loss_scale, recipe=recipe, log_data={"steps": [{"step": step}]},
    )


def test_a_checkpoint_reads_back_typed_as_it_was_written(tmp_path):
    root = tmp_path / "checkpoints"
    folder = _write(root, 4, recipe={"learning_rate": 5e-5, "lora_rank": 16},
                    loss_scale={"scale": 2.0 ** 17, "_growth_tracker": 3})
    assert folder == root / "step-4" and ckpt.verify(folder) is None and ckpt.latest_valid(root) == folder
    data = ckpt.load_checkpoint(folder)
    assert data.run == RunState(global_step=4, epoch=2, step_in_epoch=1)
    assert data.loss_scale == {"scale": 2.0 ** 17, "_growth_tracker": 3}
    assert data.recipe == {"learning_rate": 5e-5, "lora_rank": 16}
    assert torch.equal(data.trainable["unet.a.lora_A.weight"], torch.arange(6.0).reshape(2, 3) * 4)
    assert data.scheduler == {"last_epoch": 4} and data.log == {"steps": [{"step": 4}]}
    # state.json keeps the format every earlier checkpoint had, loss scale beside the counters
    state = json.loads((folder / "state.json").read_text())
    assert list(state)[:6] == ["global_step", "epoch", "step_in_epoch", "micro_batch_divisor", "train_time_s",
                               "images_seen"] and state["loss_scale"]["scale"] == 2.0 ** 17
    # a checkpoint written before recipes and loss scales were recorded still loads
    old = _write(root, 2)
    assert not (old / "recipe.json").exists()
    assert ckpt.load_checkpoint(old).recipe is None and ckpt.load_checkpoint(old).loss_scale is None


def test_damaged_and_partial_checkpoints_are_skipped_and_old_ones_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _write(root, step)
    (root / "step-6" / "optimizer.pt").write_bytes(b"bit rot")
    assert ckpt.verify(root / "step-6") == "checksum mismatch in optimizer.pt"
    assert ckpt.latest_valid(root) == root / "step-4"
    (root / "step-8").mkdir()  # a partial write
    assert ckpt.verify(root / "step-8").startswith("no checkpoint.json")
    ckpt.prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6", "step-8"]  # the newest intact one kept


@pytest.fixture()
def full_disk(monkeypatch):
    """Files opened for writing inside a checkpoint's temporary folder go to /dev/full."""
    real_open = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        if "w" in str(mode) and Path(str(file)).parent.name.startswith(".tmp-step-"):
            file = "/dev/full"
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)  # pathlib's write_bytes / write_text open through io


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_leaves_no_partial_checkpoint_and_says_so_in_words(tmp_path, full_disk):
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointWriteError) as info:
        _write(root, 2)
    message = str(info.value)
    assert "disk full" in message and "inline_container" not in message and "\n" not in message
    assert "the partial checkpoint was removed" in message
    assert list(root.iterdir()) == []  # the temporary folder is gone: the space is free again


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_run_whose_disk_fills_up_exits_1_in_words_and_resumes_once_there_is_room(tmp_path, dataset, capsys,
                                                                                      monkeypatch):
    from animelora.cli import main

    run = tmp_path / "run"
    args = ["train", "--dataset", str(dataset), "--run-dir", str(run), "--model", "tiny", "--max-steps", "6",
            "--checkpoint-every-steps", "2", "-q"]
    real_open = builtins.open

    def step_4_fills_the_disk(file, mode="r", *a, **kw):
        if "w" in str(mode) and Path(str(file)).parent.name.startswith(".tmp-step-4-"):
            file = "/dev/full"
        return real_open(file, mode, *a, **kw)

    with monkeypatch.context() as full:
        full.setattr(builtins, "open", step_4_fills_the_disk)
        full.setattr(io, "open", step_4_fills_the_disk)
        assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write the checkpoint of step 4") and "disk full" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # nothing half-written left
    assert main(args) == 0  # room again: resumes from step 2
    assert "run complete at step 6/6" in capsys.readouterr().out
