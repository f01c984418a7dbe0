"""TensorBoard event files of a run (lora/train/run/events.py), read back with TensorBoard's own
reader, as `tensorboard --logdir <workspace>/runs` reads them. The tiny model on the CPU."""
from __future__ import annotations

import json
import shutil

import pytest

from lora.testing.datasets import write_synthetic_dataset
from lora.train import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(run):
    """Every scalar and image of the run's event files, by tag (all kept: size guidance 0)."""
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"),
                                             size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _log(run):
    return json.loads((run / "training_log.json").read_text())


def test_loss_lr_validation_and_sample_sets_are_in_the_event_files(tmp_path, tiny_cfg):
    # 30 images: 3 held out, enough for the validation's interval over images
    data = write_synthetic_dataset(tmp_path / "data", 30, [(64, 64)])
    run = tmp_path / "run"
    train(tiny_cfg(dataset=str(data), max_steps=8, batch_size=8), run)  # 8 steps, 4 per epoch
    acc = _events(run)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "train/epoch_loss",
            "validation/loss", "validation/ci95_low", "validation/ci95_high"} <= scalars
    log = _log(run)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in log["steps"]], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([s["lr"] for s in log["steps"]], rel=1e-6)
    # validation at step 0 (the base model), at each epoch's end and at the last step
    validation = acc.Scalars("validation/loss")
    assert [e.step for e in validation] == [v["step"] for v in log["validation"]] == [0, 4, 8]
    assert [e.value for e in validation] == pytest.approx([v["loss"] for v in log["validation"]], rel=1e-6)
    for low, mean, high in zip(acc.Scalars("validation/ci95_low"), validation, acc.Scalars("validation/ci95_high")):
        assert low.value < mean.value < high.value
    assert [e.step for e in acc.Scalars("validation/t500")] == [0, 4, 8]
    assert [e.step for e in acc.Scalars("train/epoch_loss")] == [4, 8]
    assert [e.step for e in acc.Images("samples")] == [0, 4, 8]


def test_a_run_ending_inside_an_epoch_shows_that_epochs_loss_too(tmp_path, tiny_cfg):
    data = write_synthetic_dataset(tmp_path / "data", 30, [(64, 64)])
    run = tmp_path / "run"
    train(tiny_cfg(dataset=str(data), max_steps=6, batch_size=8), run)  # 4 steps an epoch: ends in epoch 2
    log = _log(run)
    assert log["losses"][-1]["epoch"] == 2 and log["losses"][-1].get("partial") is True
    epoch_loss = _events(run).Scalars("train/epoch_loss")
    assert [e.step for e in epoch_loss] == [4, 6]
    assert [e.value for e in epoch_loss] == pytest.approx([r["loss"] for r in log["losses"]], rel=1e-6)


def test_a_resumed_run_logs_each_step_once_even_after_a_kill(tmp_path, tiny_cfg):
    """Steps a killed segment logged after its last checkpoint are trained again by the next
    segment; TensorBoard shows them once (the next segment's file purges them)."""
    run = tmp_path / "run"
    cfg = tiny_cfg(checkpoint_every_steps=2)
    train(cfg, run, stop_at_step=5)  # checkpoints at steps 2, 4 and 5
    # as if killed after step 5 was logged but before its checkpoint was written
    shutil.rmtree(run / "checkpoints" / "step-5")
    first_loss = {e.step: e.value for e in _events(run).Scalars("train/loss")}
    assert sorted(first_loss) == [1, 2, 3, 4, 5]
    train(cfg, run)
    acc = _events(run)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("validation/loss")] == [0, 3, 6, 8]
    assert [e.step for e in acc.Images("samples")] == [0, 3, 6, 8]
    # bit-identical resume: step 5 trained again gives the loss the killed segment logged
    assert {e.step: e.value for e in acc.Scalars("train/loss")}[5] == first_loss[5]
