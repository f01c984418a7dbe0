"""``overlap_steps``: the loop queues step n+1 before it reads step n's loss.

On a GPU this keeps the card busy while the host logs a step; on CPU every operation runs at
once, so the same loop must give exactly the same run: same losses in the same order, the same
validation, checkpoints and LoRA files, the same resume, the same NaN stop.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora.train import NonFiniteLossError, train
from lora.train.step.executor import PendingStep


def _log(run) -> dict:
    return json.loads((run / "training_log.json").read_text())


def _steps(log: dict) -> list[tuple]:
    return [(s["step"], s["epoch"], s["loss"], s["grad_norm"], s["lr"], s["images"]) for s in log["steps"]]


def test_pending_step_reads_loss_and_norm_on_cpu():
    pending = PendingStep.of(torch.tensor(0.25), torch.tensor(3.0))
    assert pending.ready()
    assert pending.values() == (0.25, 3.0)
    assert PendingStep.of(torch.tensor(1.5), 2.0).values() == (1.5, 2.0)  # a float norm (no grads)


def test_overlapped_steps_train_exactly_like_reading_every_step(tmp_path, tiny_cfg):
    """Epoch ends, validation every 3 steps and step checkpoints all fall between steps."""
    common = dict(max_steps=9, batch_size=2, validate_every_steps=3, checkpoint_every_steps=4)
    seen: list[int] = []
    plain = train(tiny_cfg("phase2a", overlap_steps="off", **common), tmp_path / "off")
    over = train(tiny_cfg("phase2a", overlap_steps="on", **common), tmp_path / "on",
                 on_progress=lambda info: seen.append(info["step"]))
    assert plain.complete and over.complete
    a, b = _log(tmp_path / "off"), _log(tmp_path / "on")
    assert _steps(b) == _steps(a) and [s[0] for s in _steps(b)] == list(range(1, 10))
    assert b["validation"] == a["validation"] and [v["step"] for v in b["validation"]] == [0, 3, 6, 9]
    assert [(e["epoch"], e["loss"]) for e in b["losses"]] == [(e["epoch"], e["loss"]) for e in a["losses"]]
    assert len(b["losses"]) >= 2  # epoch ends fell inside the run
    assert seen == list(range(1, 10))  # every step reported once, in order
    assert sorted(p.name for p in (tmp_path / "on" / "checkpoints").glob("step-*")) == \
        sorted(p.name for p in (tmp_path / "off" / "checkpoints").glob("step-*"))
    wa = load_file(str(tmp_path / "off" / "lora" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "on" / "lora" / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_overlapped_run_stops_at_a_step_target_and_resumes_bit_identically(tmp_path, tiny_cfg):
    cfg = tiny_cfg("phase2a", overlap_steps="on", max_steps=7, batch_size=2)
    whole = train(cfg, tmp_path / "whole")
    first = train(cfg, tmp_path / "split", stop_at_step=3)
    assert first.stopped_reason == "step-target" and first.global_step == 3
    # the step in flight when the target was reached is logged and in the checkpoint
    assert [s["step"] for s in _log(tmp_path / "split")["steps"]] == [1, 2, 3]
    assert (tmp_path / "split" / "checkpoints" / "step-3").is_dir()
    rest = train(cfg, tmp_path / "split")
    assert whole.complete and rest.complete
    assert _steps(_log(tmp_path / "split")) == _steps(_log(tmp_path / "whole"))
    wa = load_file(str(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "split" / "lora" / "pytorch_lora_weights.safetensors"))
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_overlapped_run_stops_on_nan_without_saving_it(tmp_path, tiny_cfg):
    """Step 3's NaN is read while step 4 is queued (a checkpoint step): nothing bad reaches disk."""
    run = tmp_path / "run"
    # the largest learning rate the config allows, on a rank-1 LoRA scaled by 4096, after a warm-up
    # (step 1 at lr 0, step 2 at 0.5): step 3's gradients are the first non-finite ones
    cfg = tiny_cfg("phase2a", overlap_steps="on", learning_rate=1.0, lora_rank=1, lora_alpha=4096, warmup_steps=2,
                   lr_scheduler="constant", max_grad_norm=None, checkpoint_every_steps=2, max_steps=30)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3 "):
        train(cfg, run)
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-2"]
    for name, tensor in load_file(next((run / "checkpoints" / "step-2").glob("*.safetensors"))).items():
        assert torch.isfinite(tensor).all(), name
    assert [s["step"] for s in _log(run)["steps"]] == [1, 2]
    # a retry resumes from step 2 and stops at the same step instead of saving it
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3 "):
        train(cfg, run)


def test_overlapped_run_stops_inside_its_time_budget_with_every_step_logged(tmp_path, tiny_cfg):
    import time

    cfg = tiny_cfg("phase1.5", overlap_steps="on", max_steps=40, batch_size=2)
    run = tmp_path / "run"
    train(cfg, run, stop_at_step=1)  # warm start: model and latent cache ready
    budget = 5.0
    started = time.monotonic()
    result = train(cfg, run, time_budget_s=budget, on_progress=lambda info: time.sleep(0.2))
    assert time.monotonic() - started < budget
    assert result.stopped_reason == "time-budget" and 1 < result.global_step < 40
    log = _log(run)
    assert [s["step"] for s in log["steps"]] == list(range(1, result.global_step + 1))
    assert (run / "checkpoints" / f"step-{result.global_step}").is_dir()
