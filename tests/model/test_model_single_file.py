"""Single-file (.safetensors, original LDM key layout) checkpoints through ``load_components``.

The tiny model is written as an SD1.x-style single file (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) by a small converter below,
then loaded back with the tiny folder as the config source, the way an anime base model
would be loaded with SD1.5's configs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora.model import load_components, load_pipeline, state_dict_digest

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    lpb = cfg.layers_per_block
    n = len(cfg.block_out_channels)
    prefixes: dict[str, str] = {  # diffusers module prefix -> LDM prefix
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(n):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{idx}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
        if i < n - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op"
        has_attn = "CrossAttn" in cfg.up_block_types[i]
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{idx}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
        if i < n - 1:
            idx = i * (lpb + 1) + lpb
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if has_attn else 1}.conv"
    out = {}
    for key, value in unet.state_dict().items():
        for dprefix in sorted(prefixes, key=len, reverse=True):
            if key.startswith(dprefix + "."):
                rest = key[len(dprefix) + 1:]
                if ".resnets." in dprefix + "." or dprefix.startswith("mid_block.resnets"):
                    head, _, tail = rest.partition(".")
                    rest = f"{_RESNET[head]}.{tail}"
                out["model.diffusion_model." + prefixes[dprefix] + "." + rest] = value
                break
        else:
            raise KeyError(key)
    return out


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        k = key
        for i in range(n):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for d, ldm in attn.items():
                k = k.replace(f"attn_1.{d}.", f"attn_1.{ldm}.")
            if value.dim() == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + k] = value
    return out


def _text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out


@pytest.fixture(scope="module")
def tiny_single_file(tiny_path: Path, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    c = load_components("tiny")
    sd = {**_unet_to_ldm(c.unet), **_vae_to_ldm(c.vae), **_text_encoder_to_ldm(c.text_encoder)}
    path = tmp_path_factory.mktemp("single") / "tiny-anime.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_single_file_loads_with_local_configs(tiny_single_file: Path, tiny_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = load_components("tiny")
    got = load_components(str(tiny_single_file), config=tiny_path)
    assert got.model_id == str(tiny_single_file)
    assert type(got.noise_scheduler).__name__ == "DDPMScheduler" and got.vae_scale_factor == 8
    for name in ("unet", "vae", "text_encoder"):
        assert state_dict_digest(getattr(got, name)) == state_dict_digest(getattr(ref, name)), name
        assert not any(p.requires_grad for p in getattr(got, name).parameters())
    pipe = load_pipeline(str(tiny_single_file), config=tiny_path)
    assert pipe.safety_checker is None
