"""End-to-end training of the tiny model: logs, exports, checkpoints, budgets and OOM recovery."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora.config import ConfigError
from lora.train import FAKE_OOM_ENV, plan_total_steps, train

def log_val_name(run):
    (name,) = json.loads((run / "config.json").read_text())["validation_images"]
    return name


GUIDE_KEYS = {"epochs", "batch_size", "learning_rate", "lora_rank", "lora_alpha", "losses"}


def test_tiny_run_writes_log_validation_and_both_lora_files(tmp_path, tiny_cfg):
    cfg = tiny_cfg("phase2a", run_name="demo-run", checkpoint_every_steps=4)
    assert plan_total_steps(cfg) == 8
    seen = []
    result = train(cfg, tmp_path / "run", on_progress=seen.append)
    assert result.complete and result.stopped_reason == "complete"
    assert (result.global_step, result.total_steps) == (8, 8)
    assert [s["step"] for s in seen] == list(range(1, 9))
    assert {"step", "total_steps", "epoch", "loss", "lr", "eta_s", "images_per_sec"} <= set(seen[-1])

    run = tmp_path / "run"
    log = json.loads((run / "training_log.json").read_text())
    assert GUIDE_KEYS <= set(log)
    assert (log["epochs"], log["batch_size"], log["learning_rate"], log["lora_rank"], log["lora_alpha"]) == \
        (20, 4, 5e-5, 16, 64)
    assert log["complete"] is True and log["global_step"] == 8 and log["total_steps"] == 8
    assert log["dataset_version"] == "v0001" and log["base_model"] == "tiny" and log["preset"] == "phase2a"
    # 12 images: 1 held out, 11 train in 3 buckets of 4/4/3 -> 3 steps per epoch
    assert log["num_train_images"] == 11 and log["num_validation_images"] == 1
    assert [row["epoch"] for row in log["losses"]] == [1, 2, 3]
    assert all(row["loss"] > 0 and row["time_seconds"] >= 0 for row in log["losses"])
    assert [s["step"] for s in log["steps"]] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "images_per_sec", "epoch"} <= set(log["steps"][0])
    val = log["validation"]
    assert [v["step"] for v in val] == [0, 3, 6, 8]  # the base model, each epoch end and the end
    assert val[0]["epoch"] == 0 and set(val[-1]["per_image"]) == {config_val := log_val_name(run)}
    assert val[-1]["timesteps"] == [100, 300, 500, 700, 900] and len(val[-1]["per_image"][config_val]) == 5
    assert set(val[-1]["per_timestep"]) == {"100", "300", "500", "700", "900"}
    assert val[-1]["loss"] == pytest.approx(sum(val[-1]["per_timestep"].values()) / 5)
    assert val[0]["loss"] != val[-1]["loss"]  # the LoRA changed the prediction

    files = {p.name for p in (run / "lora").iterdir()}
    assert files == {"pytorch_lora_weights.safetensors", "demo-run.safetensors"}
    assert [p.name for p in result.lora_files] == ["pytorch_lora_weights.safetensors", "demo-run.safetensors"]
    diffusers_keys = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") and "lora_A" in k for k in diffusers_keys)
    with safe_open(str(run / "lora" / "demo-run.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert meta["ss_learning_rate"] == "5e-05" and meta["ss_num_epochs"] == "20"
    assert meta["ss_num_train_images"] == "11" and meta["ss_dataset_version"] == "v0001"
    assert json.loads(meta["ss_tag_frequency"])["demo"]["1girl"] == 11
    assert "phase2a" in meta["ss_training_comment"]
    # shared as fp16 by default, with the keys SwarmUI/A1111 index by
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["sshs_model_hash"]
    assert load_file(str(run / "lora" / "demo-run.safetensors"))[keys[0]].dtype == torch.float16

    config = json.loads((run / "config.json").read_text())
    assert config["config"]["learning_rate"] == 5e-5 and config["dataset_version"] == "v0001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]

    # calling again is a no-op that reports the finished run
    again = train(cfg, run)
    assert again.complete and again.global_step == 8 and again.lora_files == result.lora_files
    # a different config in the same folder is refused, naming the field
    with pytest.raises(ConfigError, match="learning_rate"):
        train(tiny_cfg("phase2a", run_name="demo-run", learning_rate=1e-3), run)
    # ...but a new step cap (a budget) is not a different run
    assert train(tiny_cfg("phase2a", run_name="demo-run", checkpoint_every_steps=2), run).complete


def test_damaged_and_partial_checkpoints_are_skipped(tmp_path, tiny_cfg, caplog):
    cfg = tiny_cfg("phase1.5", max_steps=6, checkpoint_every_steps=2, keep_checkpoints=5)
    run = tmp_path / "run"
    first = train(cfg, run, stop_at_step=4)
    assert (first.global_step, first.stopped_reason, first.complete) == (4, "step-target", False)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4"]
    # step-4: flipped bytes in the weights; step-6: a folder a killed writer left behind
    weights = ckpts / "step-4" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    (ckpts / "step-6").mkdir()
    (ckpts / "step-6" / "trainable.safetensors").write_bytes(b"partial")

    with caplog.at_level(logging.WARNING, logger="lora.train"):
        result = train(cfg, run)
    assert result.complete and result.global_step == 6
    text = caplog.text
    assert "step-6" in text and "partial" in text
    assert "step-4" in text and "checksum mismatch" in text
    log = json.loads((run / "training_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone once


def test_time_budget_stops_with_a_checkpoint_and_resumes(tmp_path, tiny_cfg):
    import time

    cfg = tiny_cfg("phase1.5", max_steps=40, batch_size=2, checkpoint_every_minutes=0.004)  # 0.24 s
    run = tmp_path / "run"
    train(cfg, run, stop_at_step=1)  # warm start: model and latent cache ready
    budget = 6.0
    started = time.monotonic()
    result = train(cfg, run, time_budget_s=budget, on_progress=lambda info: time.sleep(0.3))
    elapsed = time.monotonic() - started
    assert result.stopped_reason == "time-budget" and not result.complete
    assert elapsed < budget
    assert 1 < result.global_step < 40
    assert (run / "checkpoints" / f"step-{result.global_step}" / "checkpoint.json").is_file()
    kept = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert len(kept) == 3 and kept[-1] == result.global_step  # time-based ones too, newest 3 kept
    log = json.loads((run / "training_log.json").read_text())
    assert log["global_step"] == result.global_step and log["complete"] is False

    rest = train(cfg, run, stop_at_step=result.global_step + 2)
    assert rest.global_step == result.global_step + 2 and rest.stopped_reason == "step-target"


def test_fake_oom_retries_with_half_micro_batch_same_effective_batch(tmp_path, tiny_cfg, monkeypatch):
    cfg = tiny_cfg("phase2a", max_steps=4, lr_scheduler="linear", max_grad_norm=1.0)
    plain = train(cfg, tmp_path / "plain")
    monkeypatch.setenv(FAKE_OOM_ENV, "2")
    oom = train(cfg, tmp_path / "oom")
    assert plain.complete and oom.complete

    log_plain = json.loads((tmp_path / "plain" / "training_log.json").read_text())
    log_oom = json.loads((tmp_path / "oom" / "training_log.json").read_text())
    events = log_oom["events"]
    assert events == [{"step": 2, "event": "oom-retry", "micro_batch": 2, "gradient_accumulation": 2,
                       "effective_batch": 4}]
    step2 = log_oom["steps"][1]
    assert step2["oom_retry"] is True and step2["micro_batch"] == 2
    # same images per step, same losses (up to float summation order) and same weights
    assert [s["images"] for s in log_oom["steps"]] == [s["images"] for s in log_plain["steps"]]
    for a, b in zip(log_plain["steps"], log_oom["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a = load_file(str(tmp_path / "plain" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "oom" / "lora" / "pytorch_lora_weights.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_text_encoder_lora_checkpointing_bf16_and_min_snr(tmp_path, tiny_cfg):
    cfg = tiny_cfg("phase2b", max_steps=3, batch_size=2, train_text_encoder=True, gradient_checkpointing=True,
                   mixed_precision="bf16", min_snr_gamma=5.0, noise_offset=0.1, flip=True,
                   caption_shuffle=True, keep_tokens=2, warmup_steps=2, validate_every_steps=1)
    result = train(cfg, tmp_path / "run")
    assert result.complete
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert [v["step"] for v in log["validation"]] == [0, 1, 2, 3]  # step 0: the base model
    lrs = [s["lr"] for s in log["steps"]]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(2.5e-5)  # cosine with 2 warm-up steps
    assert all(s["loss"] == s["loss"] for s in log["steps"])  # no NaN in bf16
    with safe_open(str(tmp_path / "run" / "lora" / "run.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    diffusers = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in diffusers)


def test_diverging_run_stops_before_saving_a_bad_step(tmp_path, tiny_cfg):
    """An absurd learning rate blows the loss up; nothing after the last good step is saved."""
    from lora.train import NonFiniteLossError

    run = tmp_path / "run"
    # the largest learning rate the config allows, on a rank-1 LoRA scaled by 4096
    cfg = tiny_cfg("phase2a", learning_rate=1.0, lora_rank=1, lora_alpha=4096, max_grad_norm=None,
                   checkpoint_every_steps=1, max_steps=30)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step") as info:
        train(cfg, run)
    print(info.value)
    assert any((run / "checkpoints").glob("step-*")), "it diverged before any good step was saved"
    log = json.loads((run / "training_log.json").read_text()) if (run / "training_log.json").exists() else {"steps": []}
    assert all(s["loss"] == s["loss"] and abs(s["loss"]) != float("inf") for s in log["steps"])
    for ckpt in (run / "checkpoints").glob("step-*"):
        for name, tensor in load_file(next(ckpt.glob("*.safetensors"))).items():
            assert torch.isfinite(tensor).all(), (ckpt.name, name)
    # The same run diverges the same way on a retry, instead of looping or saving NaN weights.
    with pytest.raises(NonFiniteLossError):
        train(cfg, run)
