"""fp16's dynamic loss scale survives a checkpoint: a resumed segment goes on from the scale
the stopped one reached instead of starting again at 2**16 (and skipping steps to back off)."""
from __future__ import annotations

import json

import pytest
import torch

from lora.train import train
from lora.train.setup import trainer
from lora.train.step.graphed import _LossScale


def test_device_loss_scale_state_has_grad_scalers_keys_and_loads_in_place():
    scale = _LossScale(torch.device("cpu"))
    scale.found_inf.fill_(1.0)
    scale.update()  # an overflow: halved
    state = scale.state_dict()
    assert state == {"scale": 32768.0, "_growth_tracker": 0}
    assert set(state) <= set(torch.amp.GradScaler("cpu").state_dict())  # either path reads the other's
    other = _LossScale(torch.device("cpu"))
    held = other.scale  # what a captured graph points at
    other.load_state_dict({"scale": 1024.0, "_growth_tracker": 7})
    assert other.scale is held and float(held) == 1024.0 and int(other.growth_tracker) == 7


def test_a_resumed_run_continues_from_the_saved_loss_scale(tmp_path, tiny_cfg, monkeypatch):
    # accelerate makes no GradScaler on a CPU; give the trainer's accelerator a real one that
    # grows every 2 good steps, so four steps move the scale
    scalers = []
    original = trainer.make_accelerator

    def with_scaler(*args, **kwargs):
        accelerator = original(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", growth_interval=2)
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", with_scaler)
    cfg = tiny_cfg("phase2a", max_steps=6, checkpoint_every_steps=2)
    run = tmp_path / "run"
    first = train(cfg, run, stop_at_step=4)
    assert not first.complete and scalers[0].get_scale() == 2.0 ** 18
    state = json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["loss_scale"] == {"scale": 2.0 ** 18, "_growth_tracker": 0}
    assert state["global_step"] == 4
    assert train(cfg, run).complete
    assert scalers[1].get_scale() == pytest.approx(2.0 ** 19)  # from 2**18, not again from 2**16
