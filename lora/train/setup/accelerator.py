"""The accelerator and the precision a run trains in."""
from __future__ import annotations

import torch

from lora.config import TrainConfig


def mixed_precision(cfg: TrainConfig) -> str:
    """``auto``: bf16 on a GPU that supports it, else full precision."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mp: str, **kwargs):
    """An ``Accelerator`` for ``mp``, even when this process already made one with another.

    accelerate keeps a process-wide singleton that refuses a second mixed-precision mode; a
    Prefect worker or a test session trains several runs in one process, so the singleton
    (not the distributed state) is reset first.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    for state in (AcceleratorState, GradientState):
        reset = getattr(state, "_reset_state", None)
        if reset is not None:
            reset()
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=1, **kwargs)


def weight_dtype(mp: str) -> torch.dtype:
    """dtype of the frozen base weights; LoRA weights always train in fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
