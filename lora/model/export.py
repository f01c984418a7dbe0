"""Writing a trained adapter in the two formats users load: diffusers/PEFT and kohya.

- ``export_diffusers``: ``pytorch_lora_weights.safetensors`` with ``unet.<module>.lora_A.weight``
  keys, written by diffusers' own ``StableDiffusionPipeline.save_lora_weights`` (with the
  LoRA config in the header, so alpha != rank loads with the right scale).
- ``export_kohya``: the AUTOMATIC1111 / ComfyUI / kohya sd-scripts layout:
  ``lora_unet_<module path, dots as _>.lora_down.weight`` (= peft ``lora_A``),
  ``.lora_up.weight`` (= ``lora_B``) and a 0-d ``.alpha``; the delta is
  ``up @ down * alpha / rank``, which is peft's ``lora_alpha / r`` scale, so tensors carry over
  unchanged. Text encoder modules use the ``lora_te_`` prefix. ``ss_*`` / ``modelspec.*``
  metadata goes into the safetensors header (all values strings, as the format requires), with
  the ``sshs_*`` / ``modelspec.hash_sha256`` hashes computed from the tensors as saved
  (:mod:`lora.model.metadata`). Saved fp16 by default, the size LoRAs are shared at.

Both are written to a temporary name in the destination folder and renamed into place.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from lora.fsutil import atomic_write, atomic_write_bytes, make_temp_dir
from lora.runpaths import DIFFUSERS_WEIGHTS

from .lora_layers import lora_config_of
from .metadata import model_hashes

DIFFUSERS_WEIGHT_NAME = DIFFUSERS_WEIGHTS  # the name diffusers looks for; a run keeps it in lora/


def _peft_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(module).items()}


def _config_metadata(module: torch.nn.Module) -> dict:
    cfg = lora_config_of(module).to_dict()
    # sets are not JSON-serialisable; diffusers stores this dict as JSON in the header
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def export_diffusers(unet: torch.nn.Module, out_dir: Path, *, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (diffusers/PEFT format); return its path."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {
        # peft key layout (``….to_q.lora_A.weight``), which current diffusers writes and reads
        # natively; convert_state_dict_to_diffusers would downgrade the text encoder part to
        # the legacy ``lora_linear_layer.up/down`` spelling.
        "unet_lora_layers": _peft_state_dict(unet),
        "unet_lora_adapter_metadata": _config_metadata(unet),
    }
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = {
            _classic_te_path(k): v for k, v in _peft_state_dict(text_encoder).items()
        }
        kwargs["text_encoder_lora_adapter_metadata"] = _config_metadata(text_encoder)
    tmp = make_temp_dir(out_dir, ".export-")
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, weight_name=DIFFUSERS_WEIGHT_NAME, **kwargs)
        target = out_dir / DIFFUSERS_WEIGHT_NAME
        # copied into a file of our own rather than renamed: diffusers writes it private (0600),
        # and the LoRA file must follow the umask like every other output
        atomic_write(target, lambda dest: shutil.copyfile(tmp / DIFFUSERS_WEIGHT_NAME, dest), fsync=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _classic_te_path(path: str) -> str:
    """transformers 5 flattened CLIPTextModel (no ``.text_model``); A1111/ComfyUI/kohya and older
    diffusers expect ``text_model.encoder.layers.N…``. Current diffusers strips the prefix when
    the model has no ``text_model``, so the classic spelling loads everywhere."""
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_key(prefix: str, module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``lora_unet_down_blocks_0_…_to_out_0``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def _kohya_tensors(
    module: torch.nn.Module, prefix: str, alpha: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in _peft_state_dict(module).items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(peft_part):
                path = key[: -len(peft_part)]
                name = kohya_key(prefix, _classic_te_path(path) if prefix == "lora_te" else path)
                out[name + kohya_part] = tensor.to(dtype).contiguous()
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
                break
        else:
            raise ValueError(f"unexpected LoRA tensor {key!r}: only lora_A/lora_B weights can be exported to kohya format")
    return out


def export_kohya(
    unet: torch.nn.Module,
    out_path: Path,
    *,
    rank: int,
    alpha: float,
    text_encoder: torch.nn.Module | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a kohya/AUTOMATIC1111/ComfyUI ``.safetensors`` LoRA with ``ss_*`` header metadata.

    ``rank``/``alpha`` must be those the adapter was attached with (checked against peft's
    config); ``metadata`` values must be strings (JSON-encode structured values such as
    ``ss_tag_frequency``). fp16 by default (half of fp32's size, and what A1111/ComfyUI run
    LoRAs in); pass ``torch.float32`` for a lossless file.
    """
    from safetensors.torch import save

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"kohya export path must end in .safetensors: {out_path}")
    for mod, label in ((unet, "unet"), (text_encoder, "text encoder")):
        if mod is None:
            continue
        cfg = lora_config_of(mod)
        if int(cfg.r) != int(rank) or float(cfg.lora_alpha) != float(alpha):
            raise ValueError(
                f"kohya export: rank/alpha ({rank}, {alpha}) differ from the {label} adapter's "
                f"({cfg.r}, {cfg.lora_alpha})"
            )
    tensors = _kohya_tensors(unet, "lora_unet", alpha, dtype)
    if text_encoder is not None:
        tensors.update(_kohya_tensors(text_encoder, "lora_te", alpha, dtype))

    header: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_training_comment": "trained with animelora",
        "ss_network_train_unet_only": str(text_encoder is None),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"kohya metadata {key!r}: keys and values must be strings (JSON-encode structures)")
        header[key] = value
    header.update(model_hashes(tensors, header))

    # serialised here and written by us: safetensors' save_file creates its file private (0600)
    return atomic_write_bytes(out_path, save(tensors, metadata=header), fsync=False)


def _num(x: float) -> str:
    """``64.0`` -> ``"64.0"``, as kohya writes floats; ints keep a decimal point too."""
    return str(float(x))
