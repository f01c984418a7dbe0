"""LoRA attach (peft), checkpoint round trip, and the two export formats loaded back by diffusers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora.model import (
    DEFAULT_TARGET_MODULES,
    LoraStateError,
    attach_lora,
    attach_text_encoder_lora,
    export_diffusers,
    export_kohya,
    load_components,
    load_lora_state_dict,
    load_pipeline,
    lora_parameters,
    lora_state_dict,
)

RANK, ALPHA = 4, 8.0  # alpha != rank so a wrong scale would show


def _fixed_inputs(cross_dim: int):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([50, 700]),
        torch.randn(2, 77, cross_dim, generator=g),
    )


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(module):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def _unet_out(unet, inputs):
    return unet(*inputs).sample


@torch.no_grad()
def _te_out(text_encoder, tokenizer):
    ids = tokenizer(["1girl, solo, long hair"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def test_attach_lora_targets_only_and_starts_as_identity(tiny_components) -> None:
    c = tiny_components
    inputs = _fixed_inputs(c.unet.config.cross_attention_dim)
    base = _unet_out(c.unet, inputs)
    before = dict(c.unet.named_parameters())
    attach_lora(c.unet, rank=RANK, alpha=ALPHA, init_seed=0)
    trainable = [n for n, p in c.unet.named_parameters() if p.requires_grad]
    assert trainable and len(trainable) == len(lora_parameters(c.unet))
    for name in trainable:
        module_path = name.split(".lora_")[0]
        assert any(module_path.endswith("." + t) for t in DEFAULT_TARGET_MODULES), name
        assert "attn1" in module_path or "attn2" in module_path
    # base weights untouched and still frozen
    for name, p in c.unet.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad
    # B is zero -> identical output; A is random
    assert all(torch.count_nonzero(p) == 0 for n, p in c.unet.named_parameters() if "lora_B" in n)
    assert torch.equal(_unet_out(c.unet, inputs), base)
    # the same init seed gives the same adapter
    c2 = load_components("tiny")
    attach_lora(c2.unet, rank=RANK, alpha=ALPHA, init_seed=0)
    sd1, sd2 = lora_state_dict(c.unet), lora_state_dict(c2.unet)
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert len(before) < len(dict(c.unet.named_parameters()))


def test_lora_params_are_fp32_on_bf16_base_and_train(tiny_path) -> None:
    c = load_components("tiny", dtype=torch.bfloat16)
    attach_lora(c.unet, rank=RANK, alpha=ALPHA, init_seed=0)
    params = lora_parameters(c.unet)
    assert all(p.dtype == torch.float32 for p in params)
    assert c.unet.conv_in.weight.dtype == torch.bfloat16
    x, t, enc = _fixed_inputs(32)
    loss = c.unet(x.bfloat16(), t, enc.bfloat16()).sample.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(torch.count_nonzero(p.grad) > 0 for p in params)


def test_bad_lora_arguments_are_named(tiny_components) -> None:
    with pytest.raises(ValueError, match="rank"):
        attach_lora(tiny_components.unet, rank=0, alpha=1)
    with pytest.raises(ValueError, match="target_modules"):
        attach_lora(tiny_components.unet, rank=2, alpha=2, target_modules=("no_such_layer",))


def test_lora_state_dict_exact_round_trip(tiny_components, tiny_path) -> None:
    c = tiny_components
    attach_lora(c.unet, rank=RANK, alpha=ALPHA, init_seed=1)
    _perturb(c.unet, 3)
    sd = lora_state_dict(c.unet)
    other = load_components("tiny")
    attach_lora(other.unet, rank=RANK, alpha=ALPHA, init_seed=99)
    load_lora_state_dict(other.unet, sd)
    back = lora_state_dict(other.unet)
    assert all(torch.equal(sd[k], back[k]) for k in sd)
    inputs = _fixed_inputs(32)
    assert torch.equal(_unet_out(c.unet, inputs), _unet_out(other.unet, inputs))
    wrong = load_components("tiny")
    attach_lora(wrong.unet, rank=RANK * 2, alpha=ALPHA)
    with pytest.raises(LoraStateError, match="shape"):
        load_lora_state_dict(wrong.unet, sd)
    with pytest.raises(LoraStateError, match="missing"):
        load_lora_state_dict(other.unet, {k: v for k, v in sd.items() if "to_q" not in k})


def test_exports_load_back_through_diffusers(tiny_components, tmp_path: Path) -> None:
    c = tiny_components
    inputs = _fixed_inputs(c.unet.config.cross_attention_dim)
    base_unet = _unet_out(c.unet, inputs)
    base_te = _te_out(c.text_encoder, c.tokenizer)
    attach_lora(c.unet, rank=RANK, alpha=ALPHA, init_seed=0)
    attach_text_encoder_lora(c.text_encoder, rank=RANK, alpha=ALPHA, init_seed=0)
    _perturb(c.unet, 1)
    _perturb(c.text_encoder, 2)
    want_unet = _unet_out(c.unet, inputs)
    want_te = _te_out(c.text_encoder, c.tokenizer)
    assert (want_unet - base_unet).abs().max() > 1e-2
    assert (want_te - base_te).abs().max() > 1e-2

    lora_dir = tmp_path / "run" / "lora"
    diff_file = export_diffusers(c.unet, lora_dir, text_encoder=c.text_encoder)
    meta = {"ss_learning_rate": "0.0001", "ss_tag_frequency": json.dumps({"data": {"1girl": 3}})}
    export_kohya(  # fp32 here so the comparison below can be exact (default: fp16)
        c.unet, lora_dir / "run.safetensors", rank=RANK, alpha=ALPHA, text_encoder=c.text_encoder, metadata=meta,
        dtype=torch.float32,
    )
    assert diff_file == lora_dir / "pytorch_lora_weights.safetensors"
    assert sorted(p.name for p in lora_dir.iterdir()) == ["pytorch_lora_weights.safetensors", "run.safetensors"]

    with safe_open(diff_file, "pt") as f:
        keys = list(f.keys())
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
    assert any(k.startswith("text_encoder.") for k in keys)

    pipe = load_pipeline("tiny")
    for kwargs in ({}, {"weight_name": "run.safetensors"}):
        pipe.unload_lora_weights()
        assert torch.equal(_unet_out(pipe.unet, inputs), base_unet)
        pipe.load_lora_weights(lora_dir, **kwargs)
        got_unet = _unet_out(pipe.unet, inputs)
        got_te = _te_out(pipe.text_encoder, pipe.tokenizer)
        torch.testing.assert_close(got_unet, want_unet, rtol=1e-4, atol=1e-5, msg=f"unet via {kwargs}")
        torch.testing.assert_close(got_te, want_te, rtol=1e-4, atol=1e-5, msg=f"text encoder via {kwargs}")

    # and the whole pipeline's image changes with the adapter
    def image():
        return pipe("1girl, solo", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    with_lora = image()
    pipe.unload_lora_weights()
    assert abs(with_lora - image()).max() > 1e-3


def test_kohya_keys_alpha_and_metadata(tiny_components, tmp_path: Path) -> None:
    c = tiny_components
    attach_lora(c.unet, rank=RANK, alpha=ALPHA, init_seed=0)
    attach_text_encoder_lora(c.text_encoder, rank=RANK, alpha=ALPHA, init_seed=0)
    _perturb(c.unet, 1)
    tag_freq = json.dumps({"5_miku": {"1girl": 10, "hatsune miku": 10}})
    path = export_kohya(c.unet, tmp_path / "miku.safetensors", rank=RANK, alpha=ALPHA, text_encoder=c.text_encoder,
                        metadata={"ss_learning_rate": "5e-05", "ss_tag_frequency": tag_freq})
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_learning_rate"] == "5e-05" and json.loads(meta["ss_tag_frequency"]) == json.loads(tag_freq)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[stem + ".lora_down.weight"].shape == (RANK, 32)
    assert tensors[stem + ".lora_up.weight"].shape == (32, RANK)
    assert tensors[stem + ".alpha"].dim() == 0 and tensors[stem + ".alpha"].item() == ALPHA
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    # down/up carry peft's lora_A/lora_B unchanged (in the file's fp16 by default)
    peft_a = dict(c.unet.named_parameters())[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    ]
    assert tensors[stem + ".lora_down.weight"].dtype == torch.float16
    assert torch.equal(tensors[stem + ".lora_down.weight"], peft_a.detach().half())
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in modules)
    assert len(tensors) == 3 * len(modules)
    with pytest.raises(ValueError, match="rank/alpha"):
        export_kohya(c.unet, tmp_path / "bad.safetensors", rank=RANK, alpha=1.0)
    with pytest.raises(TypeError, match="strings"):
        export_kohya(c.unet, tmp_path / "bad.safetensors", rank=RANK, alpha=ALPHA, metadata={"ss_epoch": 3})
    assert not (tmp_path / "bad.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["miku.safetensors"]


def test_conv_and_linear_targets_export_both_formats(tiny_components, tmp_path: Path) -> None:
    """Non-default targets (Conv2d proj_in / resnet conv1 next to Linear to_q) keep their shapes."""
    c = tiny_components
    inputs = _fixed_inputs(32)
    attach_lora(c.unet, rank=2, alpha=1.0, target_modules=("to_q", "proj_in", "conv1"), init_seed=0)
    _perturb(c.unet, 5)
    want = _unet_out(c.unet, inputs)
    export_diffusers(c.unet, tmp_path)
    path = export_kohya(c.unet, tmp_path / "conv.safetensors", rank=2, alpha=1.0, dtype=torch.float16)
    with safe_open(path, "pt") as f:
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        up = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight")
    assert down.dtype == torch.float16 and down.shape == (2, 32, 3, 3) and up.shape == (32, 2, 1, 1)
    pipe = load_pipeline("tiny")
    for kwargs, tol in (({}, 1e-5), ({"weight_name": "conv.safetensors"}, 5e-2)):  # fp16 file: looser
        pipe.unload_lora_weights()
        pipe.load_lora_weights(tmp_path, **kwargs)
        torch.testing.assert_close(_unet_out(pipe.unet, inputs), want, rtol=tol, atol=tol)
