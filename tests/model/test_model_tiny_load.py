"""The built-in tiny model and base-model resolution/loading."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lora.model import (
    TINY_RESOLUTION,
    Components,
    ModelLoadError,
    ensure_tiny_model,
    load_components,
    load_pipeline,
    resolve_model,
    state_dict_digest,
)


def test_tiny_model_is_deterministic_and_cached(tmp_path: Path, tiny_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    a = ensure_tiny_model(tmp_path / "a")
    b = ensure_tiny_model(tmp_path / "b")
    assert a.name == b.name == "tiny-sd15-v1"
    digests = [
        state_dict_digest(UNet2DConditionModel.from_pretrained(p, subfolder="unet")) for p in (a, b, tiny_path)
    ]
    assert digests[0] == digests[1] == digests[2]
    assert (a / "tokenizer" / "vocab.json").read_bytes() == (b / "tokenizer" / "vocab.json").read_bytes()
    assert (a / "tokenizer" / "merges.txt").read_bytes() == (b / "tokenizer" / "merges.txt").read_bytes()
    # cached: a second call returns the same folder without rebuilding
    mtime = (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "a") == a
    assert (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    # no temporary build folders left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tiny-sd15-v1"]


def test_tiny_folder_layout_and_scheduler(tiny_path: Path) -> None:
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_path / sub).is_dir()
    sched = json.loads((tiny_path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert sched["num_train_timesteps"] == 1000 and sched["prediction_type"] == "epsilon"
    vae = json.loads((tiny_path / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == 0.18215


def test_tokenizer_is_real_clip_bpe(tiny_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer")
    ids = tok("1girl, solo, long hair").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # common tags are whole tokens: 1 / girl / , / solo / , / long / hair
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["1</w>", "girl</w>", ",</w>", "solo</w>", ",</w>", "long</w>", "hair</w>"]
    assert len(tok("hatsune miku, watercolor, masterpiece").input_ids) == 8
    padded = tok("1girl, solo, long hair", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert tok.model_max_length == 77 and len(padded.input_ids) == 77
    assert padded.input_ids[len(ids):] == [tok.pad_token_id] * (77 - len(ids))
    # unseen text still round-trips through byte-level fallback
    assert tok.decode(tok("Zebra ünïcode 日本").input_ids, skip_special_tokens=True) == "zebra ünïcode 日本"


def test_load_components_tiny_is_frozen_and_trains(tiny_components: Components) -> None:
    c = tiny_components
    assert c.model_id == "tiny" and c.vae_scale_factor == 8 and c.default_resolution == TINY_RESOLUTION == 64
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    for m in (c.unet, c.vae, c.text_encoder):
        assert not any(p.requires_grad for p in m.parameters())
    # text encoder -> UNet conditioning shapes agree
    ids = c.tokenizer(["1girl, solo"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    enc = c.text_encoder(ids)[0]
    assert enc.shape == (4, 77, c.unet.config.cross_attention_dim)
    latents = c.vae.encode(torch.randn(4, 3, 64, 64)).latent_dist.sample() * c.vae.config.scaling_factor
    assert latents.shape == (4, 4, 8, 8)
    # a UNet forward+backward at batch 4 (all UNet weights trainable: an upper bound for LoRA)
    c.unet.requires_grad_(True)
    c.unet.train()
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        out = c.unet(latents, torch.randint(0, 1000, (4,)), enc.detach()).sample
        out.float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    print(f"\ntiny UNet train step (batch 4, 64 px, full backward): {best * 1000:.1f} ms")
    # Speed goals live in bench/, not in unit tests; this only shows the figure.


def test_load_pipeline_tiny_generates(tiny_path: Path) -> None:
    pipe = load_pipeline("tiny")
    assert pipe.safety_checker is None
    img = pipe("1girl, solo", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_resolve_model_kinds(tiny_path: Path, tmp_path: Path) -> None:
    assert resolve_model("tiny") == tiny_path
    assert resolve_model(str(tiny_path)) == tiny_path
    assert resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")
    assert resolve_model(str(ckpt)) == ckpt
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_local_diffusers_folder_loads(tiny_path: Path) -> None:
    c = load_components(str(tiny_path), dtype=torch.bfloat16)
    assert c.unet.dtype == torch.bfloat16 and c.text_encoder.dtype == torch.bfloat16
    assert c.model_id == str(tiny_path) and c.default_resolution == 64


@pytest.mark.timeout(60)  # offline must fail fast, never hang on retries
def test_unreachable_hub_id_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_components("nobody-animelora/does-not-exist")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        "cannot load base model 'nobody-animelora/does-not-exist': not in the local Hugging Face cache and "
        "the Hub is unreachable; download it first with `huggingface-cli download nobody-animelora/does-not-exist` "
        "or pass --model PATH"
    )
    with pytest.raises(ModelLoadError, match="Hub is unreachable"):
        load_pipeline("nobody-animelora/does-not-exist")


def test_missing_local_path_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"cannot load base model '.*nothere': no such file or folder"):
        load_components(str(tmp_path / "nothere"))


def test_single_file_offline_gives_clear_error(tiny_path: Path, tmp_path: Path, monkeypatch) -> None:
    """A single .safetensors checkpoint needs SD1.5's component configs and tokenizer, which are
    not in the checkpoint; offline and uncached, the user gets one line saying what to download."""
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "anime-model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(ckpt))
    with pytest.raises(ModelLoadError) as info:
        load_components(str(ckpt))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot load base model '{ckpt}': single-file loading needs the SD1.5 component configs")
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    with pytest.raises(ModelLoadError, match="single-file loading"):
        load_pipeline(str(ckpt))
