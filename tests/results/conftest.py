"""Fixtures for the results area: guide-style logs, a tiny run with a real LoRA, a loopback Hub.

The tiny run is built like a finished training run, without the trainer: the tiny SD1.5
pipeline, a LoRA attached to its UNet and moved away from zero with a seeded generator,
exported in both formats. Next to it lie the things that must never be published: a
checkpoint with optimizer state, a cache, and a config holding a secret.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "hf_planted_secret_do_not_publish_42"
PROMPTS = ["1girl, anime watercolor style, masterpiece", "sketch, 1girl, monochrome, anime style"]


@pytest.fixture()
def guide_log() -> Path:
    """The guide's phase1.5 log: falls until epoch 3, then rises, ends 3.7% worse."""
    return FIXTURES / "phase1.5_training_log.json"


def make_epoch_log(losses, **extra) -> dict:
    """A log in the guide's minimal schema (plus any extended keys)."""
    log = {"epochs": len(losses), "batch_size": 4, "learning_rate": 5e-5, "lora_rank": 16,
           "lora_alpha": 64,
           "losses": [{"epoch": i + 1, "loss": v, "time_seconds": 10.0 * (i + 1)}
                      for i, v in enumerate(losses)]}
    log.update(extra)
    return log


@pytest.fixture()
def epoch_log():
    """Builds a guide-schema log from a list of epoch losses (extra keys as keywords)."""
    return make_epoch_log


@pytest.fixture()
def hf_env(monkeypatch, tmp_path):
    """Hub client settings for loopback tests: no Xet, no offline switch, a private HF_HOME."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH",
                        str(tmp_path / "hf-home" / "stored_tokens"))
    return tmp_path / "hf-home"


def _export_perturbed_lora(run: Path, pipe, seed: int) -> Path:
    """Move the LoRA weights away from zero (seeded) and export both formats into run/lora."""
    import torch

    from lora.model import export_diffusers, export_kohya

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    export_diffusers(pipe.unet, run / "lora")
    export_kohya(pipe.unet, run / "lora" / f"{run.name}.safetensors", rank=4, alpha=4)
    return run


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two finished tiny runs (different LoRA weights), each with logs, config and clutter."""
    from lora.model import attach_lora, load_pipeline

    root = tmp_path_factory.mktemp("runs")
    pipe = load_pipeline("tiny")
    attach_lora(pipe.unet, rank=4, alpha=4)
    runs = []
    for i, name in enumerate(("tiny-a", "tiny-b")):
        run = root / name
        _export_perturbed_lora(run, pipe, seed=100 + i)
        log = make_epoch_log([0.30, 0.26, 0.24, 0.23], run_name=name, preset="phase2a",
                             lora_rank=4, lora_alpha=4, dataset_size=12,
                        dataset_version="v0002", base_model="tiny", complete=True,
                        validation=[{"step": 4 * (k + 1), "epoch": k + 1, "loss": 0.5 - 0.02 * k - i * 0.1,
                                     "per_timestep": {"100": 0.2, "500": 0.4 - 0.01 * k}}
                                    for k in range(4)])
        (run / "training_log.json").write_text(json.dumps(log))
        (run / "config.json").write_text(json.dumps({
            "model": "tiny", "preset": "phase2a", "epochs": 4, "batch_size": 4,
            "learning_rate": 5e-5, "lora_rank": 4, "lora_alpha": 4, "resolution": 64,
            "dataset": "demo", "dataset_version": "v0002", "hf_token": SECRET,
        }))
        ckpt = run / "checkpoints" / "step-4"
        ckpt.mkdir(parents=True)
        (ckpt / "optimizer.pt").write_bytes(b"optimizer state " + SECRET.encode())
        (ckpt / "adapter.safetensors").write_bytes(b"checkpoint weights")
        (ckpt / "checkpoint.json").write_text("{}")
        (run / "cache").mkdir()
        (run / "cache" / "latents.safetensors").write_bytes(b"cached latents")
        (run / ".env").write_text(f"HF_TOKEN={SECRET}\n")
        (run / "samples").mkdir()
        runs.append(run)
    return runs[0], runs[1]


@pytest.fixture(scope="session")
def sampled(lora_runs, tmp_path_factory):
    """generate_samples run once: tiny-a's samples/ (base vs tiny-a vs tiny-b)."""
    from lora.sample import SampleRequest, generate_samples

    run_a, run_b = lora_runs
    result = generate_samples("tiny", [run_a, run_b], run_a / "samples",
                              SampleRequest(prompts=PROMPTS, seeds=(0, 1)), device="cpu")
    return result


@pytest.fixture()
def sample_prompts() -> list[str]:
    return list(PROMPTS)


@pytest.fixture()
def run_copy(lora_runs, sampled, tmp_path) -> Path:
    """A private copy of the sampled tiny-a run, so a test may stage or break it freely."""
    target = tmp_path / "runs" / "tiny-a"
    shutil.copytree(lora_runs[0], target)
    return target
