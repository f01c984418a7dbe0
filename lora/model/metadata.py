"""Header metadata of the kohya-format LoRA file: what AUTOMATIC1111, ComfyUI, SwarmUI and
kohya's own tools read without loading the tensors.

Three families of keys, all strings (the safetensors header holds only strings):

- ``ss_*``: kohya sd-scripts' training record (network, schedule, data, tag frequencies). The
  "Training info" / metadata views of A1111 and the Civitai uploader show these.
- ``modelspec.*``: the Stability AI model metadata standard. SwarmUI (and other loaders that
  follow the standard) identify the file by ``modelspec.architecture`` and show title,
  resolution, trigger phrase and date from it.
- ``sshs_model_hash`` / ``sshs_legacy_hash``: hashes precomputed the way kohya's trainer does,
  so UIs need not hash the file when indexing it. As kohya describes them: the tensors are
  serialised with only the ``ss_*`` metadata (so later edits of other metadata do not change
  them); the model hash is the SHA-256 of everything after the 8-byte length and the JSON
  header (the tensor data: A1111's "addnet" hash of a safetensors LoRA), the legacy hash the
  first 8 hex digits of the SHA-256 of the 64 KiB that start 1 MiB into that serialisation
  (empty for files under 1 MiB, as in kohya's tools). ``modelspec.hash_sha256`` is the same
  tensor-data digest with the standard's ``0x`` prefix.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

if TYPE_CHECKING:  # lora.train depends on lora.model, not the reverse
    from lora.config import TrainConfig
    from lora.train.plan import DataPlan

#: ``--save-dtype`` names of the kohya file's tensors. fp16 is what LoRAs are shared in: half the
#: size of fp32, and A1111/ComfyUI compute in fp16 anyway.
SAVE_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
DEFAULT_SAVE_DTYPE = "fp16"

MODELSPEC_VERSION = "1.0.0"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"
#: Module names in the file are diffusers' (``lora_unet_down_blocks_0_…``).
MODELSPEC_IMPLEMENTATION = "diffusers"

_LEGACY_OFFSET = 0x100000  # 1 MiB
_LEGACY_LENGTH = 0x10000  # 64 KiB


def save_torch_dtype(name: str) -> torch.dtype:
    """``"fp16"`` -> ``torch.float16``; a one-line error naming the accepted names otherwise."""
    try:
        return SAVE_DTYPES[name]
    except KeyError:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}") from None


def _tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def tag_frequency(dataset_name: str, captions: Iterable[str]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per data-set folder, how often each caption tag occurs."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(_tags(caption))
    return {dataset_name: dict(sorted(counts.items()))}


def infer_trigger_word(captions: Iterable[str]) -> str | None:
    """The trigger word the captions were written with, or None.

    ``fetch``/``import --trigger-word`` put it first in every caption; without one, captions
    start with a count tag (1girl, solo ...) or vary. So: the first tag when it is the same in
    every caption, is followed by other tags and is not a count tag.
    """
    from lora.data.captions import is_count_tag

    first: str | None = None
    seen = False
    for caption in captions:
        tags = _tags(caption)
        if len(tags) < 2:
            return None
        if first is None:
            first = tags[0]
        elif tags[0] != first:
            return None
        seen = True
    if not seen or first is None or is_count_tag(first.replace(" ", "_")):
        return None
    return first


def training_metadata(
    cfg: "TrainConfig",
    plan: "DataPlan",
    state: Mapping[str, Any],
    mixed_precision: str,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` keys for a run's kohya file (hashes are added on export)."""
    finished = time.time() if now is None else now
    captions = [item.caption for item in plan.train_items]
    trigger = infer_trigger_word(captions)
    values: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.lora_rank,
        "ss_network_alpha": cfg.lora_alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.learning_rate,
        "ss_text_encoder_lr": (cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else 0,
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_num_epochs": cfg.epochs,
        "ss_epoch": state["epoch"] - (1 if state["step_in_epoch"] == 0 else 0),
        "ss_num_train_images": len(plan.train_items),
        "ss_num_validation_images": len(plan.val_items),
        "ss_num_batches_per_epoch": plan.steps_per_epoch * cfg.gradient_accumulation,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * cfg.gradient_accumulation,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation,
        "ss_max_train_steps": plan.total_steps,
        "ss_steps": state["global_step"],
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.warmup_steps,
        "ss_max_grad_norm": cfg.max_grad_norm or 0.0,
        "ss_min_snr_gamma": cfg.min_snr_gamma or 0,
        "ss_noise_offset": cfg.noise_offset,
        "ss_mixed_precision": mixed_precision,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing or cfg.low_memory,
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if cfg.optimizer == "adamw8bit" else "torch.optim.AdamW",
        "ss_seed": cfg.seed,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": True,
        "ss_flip_aug": cfg.flip,
        "ss_shuffle_caption": cfg.caption_shuffle,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_tag_frequency": json.dumps(tag_frequency(plan.dataset_dir.name, captions)),
        "ss_dataset_version": plan.version,
        "ss_sd_model_name": cfg.model,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_output_name": cfg.run_name,
        "ss_training_comment": f"animelora preset {cfg.preset}, run {cfg.run_name}, "
                               f"data set {plan.dataset_dir.name} {plan.version}",
        "ss_training_finished_at": str(int(finished)),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": cfg.run_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.fromtimestamp(int(finished), timezone.utc).isoformat(),
        "modelspec.description": f"Anime-style LoRA for Stable Diffusion 1.5 trained by animelora "
                                 f"(preset {cfg.preset}) on data set {plan.dataset_dir.name} "
                                 f"{plan.version}",
    }
    if trigger:
        values["modelspec.trigger_phrase"] = trigger
        values["modelspec.usage_hint"] = f"put {trigger} first in the prompt"
    return {k: str(v) for k, v in values.items()}


def _tensor_data(serialised: bytes) -> memoryview:
    header_len = int.from_bytes(serialised[:8], "little")
    return memoryview(serialised)[8 + header_len:]


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash``, ``sshs_legacy_hash`` and ``modelspec.hash_sha256`` of the file that
    ``tensors`` will be saved as (see the module docstring for what each hashes)."""
    from safetensors.torch import save

    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialised = save(dict(tensors), metadata=training_only or None)
    model_hash = hashlib.sha256(_tensor_data(serialised)).hexdigest()
    legacy = serialised[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8],
        "modelspec.hash_sha256": "0x" + model_hash,
    }
