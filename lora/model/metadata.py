"""Header metadata of the kohya-format LoRA file: what AUTOMATIC1111, ComfyUI, SwarmUI and
kohya's own tools read without loading the tensors. The format's parts live here; which values
a run writes (its recipe, data and steps) is the trainer's: ``lora/train/export.py``.

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
from collections import Counter
from typing import Iterable, Mapping

import torch

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
