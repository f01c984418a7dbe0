"""Base model loading (tiny / Hub id / diffusers folder / single file), LoRA attach and exports."""
from .load import (
    DEFAULT_MODEL,
    Components,
    ModelLoadError,
    load_components,
    load_pipeline,
    resolve_model,
    stored_dtype,
)
from .tiny import (
    TINY_MODEL_NAME,
    TINY_RESOLUTION,
    TINY_VAE_SCALE_FACTOR,
    default_cache_root,
    ensure_tiny_model,
    state_dict_digest,
)

__all__ = [
    "DEFAULT_MODEL",
    "Components",
    "ModelLoadError",
    "load_components",
    "load_pipeline",
    "resolve_model",
    "stored_dtype",
    "TINY_MODEL_NAME",
    "TINY_RESOLUTION",
    "TINY_VAE_SCALE_FACTOR",
    "default_cache_root",
    "ensure_tiny_model",
    "state_dict_digest",
]

from .export import DIFFUSERS_WEIGHT_NAME, export_diffusers, export_kohya, kohya_key  # noqa: E402
from .metadata import (  # noqa: E402
    DEFAULT_SAVE_DTYPE,
    SAVE_DTYPES,
    infer_trigger_word,
    model_hashes,
    save_torch_dtype,
    tag_frequency,
)
from .lora_layers import (  # noqa: E402
    DEFAULT_TARGET_MODULES,
    TEXT_ENCODER_TARGET_MODULES,
    LoraStateError,
    attach_lora,
    attach_text_encoder_lora,
    has_lora,
    load_lora_state_dict,
    lora_config_of,
    lora_parameters,
    lora_state_dict,
)

__all__ += [
    "DEFAULT_SAVE_DTYPE",
    "SAVE_DTYPES",
    "infer_trigger_word",
    "model_hashes",
    "save_torch_dtype",
    "tag_frequency",
    "DIFFUSERS_WEIGHT_NAME",
    "export_diffusers",
    "export_kohya",
    "kohya_key",
    "DEFAULT_TARGET_MODULES",
    "TEXT_ENCODER_TARGET_MODULES",
    "LoraStateError",
    "attach_lora",
    "attach_text_encoder_lora",
    "has_lora",
    "load_lora_state_dict",
    "lora_config_of",
    "lora_parameters",
    "lora_state_dict",
]
