"""The run's LoRA files: both formats written into ``RUN/lora/``, and what the kohya file states.

The kohya file's ``ss_*`` and ``modelspec.*`` keys are built here and not in
lora/model/metadata.py (which owns the format: key families, model-spec constants, the hashes):
the values come from the run's recipe and data plan, which the model layer does not know; the
model layer stays below the trainer. The recipe is the one the checkpoints recorded (a resumed
run is refused under any other), so the file states what the weights were trained with.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from lora.config import TrainConfig
from lora.model import export_diffusers, export_kohya, save_torch_dtype
from lora.model.metadata import (MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, MODELSPEC_VERSION,
                                 infer_trigger_word, tag_frequency)
from lora.runpaths import RunPaths
from lora.train.checkpoint import RunState
from lora.train.data.plan import DataPlan


def export_lora(run_dir: Path, cfg: TrainConfig, plan: DataPlan, run: RunState, mixed_precision: str, *,
                accelerator, unet, text_encoder=None) -> list[Path]:
    """Write both LoRA formats into ``run_dir/lora`` (temporary folder, then rename); the main
    process writes, the others wait for it. Returns the two files."""
    paths = RunPaths(run_dir)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return paths.exported_lora_files(cfg.run_name or run_dir.name)
    unet = accelerator.unwrap_model(unet)
    tmp = run_dir / f".lora-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_diffusers(unet, tmp, text_encoder=text_encoder)
    export_kohya(unet, tmp / paths.kohya_weights(cfg.run_name).name, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                 text_encoder=text_encoder,
                 metadata=training_metadata(cfg, plan, run.to_checkpoint(), mixed_precision),
                 dtype=save_torch_dtype(cfg.save_dtype))
    paths.lora.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, paths.lora / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return paths.exported_lora_files(cfg.run_name or run_dir.name)


def training_metadata(
    cfg: TrainConfig,
    plan: DataPlan,
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
        "ss_gradient_checkpointing": cfg.speed.gradient_checkpointing or cfg.speed.low_memory,
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
