"""Components loaded as their files store them (``load_components(dtype=None)``, what the
trainer does): fp16 files stay fp16 on the CPU, and the trainer's one cast to bf16 gives the
same weights as widening them to fp32 first (the old way, which cost the CPU seconds)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lora.model import load_components, stored_dtype


def _fp16_copy(tiny_path: Path, dest: Path) -> Path:
    """The tiny model with its UNet, VAE and text encoder saved in fp16 (as many SD1.5 folders are)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(tiny_path, dest)
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        shutil.rmtree(dest / sub)
        cls.from_pretrained(tiny_path, subfolder=sub).to(torch.float16).save_pretrained(dest / sub)
    return dest


def test_stored_dtype_reads_the_safetensors_header(tiny_path, tmp_path):
    assert stored_dtype(tiny_path, "unet") == torch.float32
    half = _fp16_copy(tiny_path, tmp_path / "half")
    assert {stored_dtype(half, s) for s in ("unet", "vae", "text_encoder")} == {torch.float16}
    assert stored_dtype(half, "no-such-part") is None
    broken = tmp_path / "broken" / "unet"
    broken.mkdir(parents=True)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 16)
    assert stored_dtype(tmp_path / "broken", "unet") is None  # cannot tell: loaded as fp32


def test_as_stored_then_one_cast_gives_the_same_weights_as_widening_first(tiny_path, tmp_path):
    half = _fp16_copy(tiny_path, tmp_path / "half")
    stored = load_components(str(half), dtype=None)
    widened = load_components(str(half), dtype=torch.float32)
    assert stored.unet.dtype == stored.vae.dtype == stored.text_encoder.dtype == torch.float16
    assert not any(p.requires_grad for p in stored.unet.parameters())  # frozen as before
    unet_a = stored.unet.to(torch.bfloat16).state_dict()
    unet_b = widened.unet.to(torch.bfloat16).state_dict()
    assert unet_a.keys() == unet_b.keys() and all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    vae_a = stored.vae.to(torch.float32).state_dict()  # the latent cache's VAE: fp16 -> fp32 is exact
    vae_b = widened.vae.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    # a tiny fp32 folder loads as fp32 either way (the CPU runs' path is unchanged)
    assert load_components(str(tiny_path), dtype=None).unet.dtype == torch.float32
