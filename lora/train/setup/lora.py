"""LoRA on the UNet (and the text encoder when it trains): seeded, in fp32 on a frozen base."""
from __future__ import annotations

import torch

from lora.config import TrainConfig
from lora.model import attach_lora, attach_text_encoder_lora
from lora.train.seeds import derive_seed


def setup_lora_unet(cfg: TrainConfig, unet, device, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Cast the frozen UNet, attach LoRA (seeded), keep LoRA in fp32; returns trainable params."""
    from diffusers.training_utils import cast_training_params

    unet.to(device, dtype=dtype)  # from the dtype its files store (lora.model.stored_dtype)
    attach_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                dropout=cfg.lora_dropout, init_seed=derive_seed(cfg.seed, "lora-init"))
    if dtype != torch.float32:
        keep_activation_dtype(unet)
    cast_training_params(unet, dtype=torch.float32)  # only the trainable (LoRA) weights
    trainable = {f"unet.{name}": p for name, p in unet.named_parameters() if p.requires_grad}
    if cfg.speed.gradient_checkpointing or cfg.speed.low_memory:
        unet.enable_gradient_checkpointing()
    unet.train()
    return trainable


def keep_activation_dtype(module: torch.nn.Module) -> None:
    """Stop peft from casting each LoRA layer's input to the fp32 LoRA weights' dtype.

    Why: every training forward runs under autocast, which casts a linear layer's input back
    to bf16/fp16 anyway, so peft's cast is an activation copy there and back that changes
    nothing: the LoRA matmuls see the same bf16 values either way. (Small: about 1 ms of an
    H200's 49 ms eager step at batch 4, bench/README.md.)
    """
    for m in module.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


def setup_text_encoder_lora(cfg: TrainConfig, text_encoder, device, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    """Attach LoRA to the text encoder (seeded), LoRA in fp32; returns its trainable params,
    named ``text_encoder.<name>`` as checkpoints store them."""
    from diffusers.training_utils import cast_training_params

    text_encoder.to(device, dtype=dtype)
    attach_text_encoder_lora(text_encoder, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             init_seed=derive_seed(cfg.seed, "te-lora-init"))
    cast_training_params(text_encoder, dtype=torch.float32)
    trainable = {f"text_encoder.{name}": p for name, p in text_encoder.named_parameters() if p.requires_grad}
    if cfg.speed.gradient_checkpointing or cfg.speed.low_memory:
        enable = getattr(text_encoder, "activation_checkpointing_enable", None) or \
            text_encoder.gradient_checkpointing_enable
        enable()
    text_encoder.train()
    return trainable
