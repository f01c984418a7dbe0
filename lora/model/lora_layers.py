"""Attaching LoRA adapters with peft, and the exact state-dict round trip used by checkpoints.

Why peft via ``unet.add_adapter``: diffusers' own training scripts do this, so
``get_peft_model_state_dict`` + ``save_lora_weights`` export files that
``pipe.load_lora_weights`` reads back without conversion, and the UNet stays a plain
``UNet2DConditionModel`` (no PeftModel wrapper) for the trainer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_NAME = "default"


class LoraStateError(ValueError):
    """A LoRA state dict does not match the adapters attached to the model."""


def _lora_config(rank: int, alpha: float, target_modules: Sequence[str], dropout: float):
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank: expected a positive integer, got {rank!r}")
    if not alpha or alpha <= 0:
        raise ValueError(f"lora alpha: expected a positive number, got {alpha!r}")
    if not (0.0 <= dropout < 1.0):
        raise ValueError(f"lora dropout: expected 0 <= dropout < 1, got {dropout!r}")
    targets = list(target_modules)
    if not targets:
        raise ValueError("lora target_modules: expected at least one module name")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the model is unchanged until trained
        target_modules=targets,
    )


def _inject(model: torch.nn.Module, config) -> None:
    """diffusers models: their own ``add_adapter``. transformers models: peft directly, because
    transformers' ``add_adapter`` insists on a newer peft than diffusers needs; we then record
    the config the way both libraries' mixins do, so ``get_peft_model_state_dict`` finds it."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name=ADAPTER_NAME)
        return
    from peft import inject_adapter_in_model

    if getattr(model, "peft_config", None) and ADAPTER_NAME in model.peft_config:
        raise ValueError(f"{type(model).__name__} already has a LoRA adapter attached")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    if not isinstance(getattr(model, "peft_config", None), dict):
        model.peft_config = {}
    model.peft_config[ADAPTER_NAME] = config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True


def _attach(model: torch.nn.Module, config, init_seed: int | None) -> None:
    targets = set(config.target_modules)
    names = {n for n, _ in model.named_modules()}
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ValueError(
            f"lora target_modules: none of {sorted(targets)} exists in {type(model).__name__}"
        )
    if init_seed is None:
        _inject(model, config)
    else:
        # Seed only the adapter init, leaving the caller's global RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            _inject(model, config)
    # LoRA weights train in fp32 even when the frozen base is bf16/fp16; peft's forward casts
    # activations to the adapter dtype and the result back.
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)


def attach_lora(
    unet: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
    init_seed: int | None = None,
) -> None:
    """Add a trainable LoRA adapter (scale alpha/rank) to ``unet``'s ``target_modules``.

    Base weights are left as they are (``load_components`` already froze them); only the
    new ``lora_A``/``lora_B`` parameters require grad. ``lora_B`` starts at zero, so the
    UNet's output is unchanged until training moves it.
    """
    _attach(unet, _lora_config(rank, alpha, target_modules, dropout), init_seed)


def attach_text_encoder_lora(
    text_encoder: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = TEXT_ENCODER_TARGET_MODULES,
    dropout: float = 0.0,
    init_seed: int | None = None,
) -> None:
    """The same for the CLIP text encoder (attention projections by default)."""
    _attach(text_encoder, _lora_config(rank, alpha, target_modules, dropout), init_seed)


def has_lora(module: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``module``, in a stable (named_parameters) order."""
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed by their parameter names (detached CPU copies), for checkpoints."""
    return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if "lora_" in n}


def load_lora_state_dict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a ``lora_state_dict`` back bit-exactly; the key set and shapes must match exactly."""
    params = {n: p for n, p in module.named_parameters() if "lora_" in n}
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise LoraStateError(
            f"LoRA state dict does not match the attached adapters: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}); "
            "was it saved with other target modules?"
        )
    with torch.no_grad():
        for name, param in params.items():
            src = state_dict[name]
            if tuple(src.shape) != tuple(param.shape):
                raise LoraStateError(
                    f"LoRA state dict: {name} has shape {tuple(src.shape)}, model expects {tuple(param.shape)} "
                    "(different rank?)"
                )
            param.copy_(src.to(device=param.device, dtype=param.dtype))


def lora_config_of(module: torch.nn.Module):
    """The peft ``LoraConfig`` attached to ``module`` (for export metadata)."""
    cfg = getattr(module, "peft_config", None)
    if not cfg or ADAPTER_NAME not in cfg:
        raise ValueError(f"{type(module).__name__} has no LoRA adapter attached (call attach_lora first)")
    return cfg[ADAPTER_NAME]
