"""The optimizer and the learning-rate schedule (the step runner alone steps and reads it)."""
from __future__ import annotations

import torch

from lora.config import ConfigError, TrainConfig


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "invalid training config: optimizer: adamw8bit needs the bitsandbytes package "
                "(pip install bitsandbytes) and a CUDA GPU; use optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=True if fused else None)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    name = cfg.lr_scheduler
    if name == "constant" and cfg.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max(1, total_steps))
