"""Everything a segment trains with, built once at its start: :func:`set_up` -> :class:`TrainingSetup`.

Order matters for memory: the UNet waits on the CPU (as its files store it) until the latent
cache is built (in fp32 beside the VAE's activations it took an H200's set-up peak to 17.9
GiB), the VAE leaves the card once the cache is built, and the UNet then moves in the
training dtype (half the size), tensor by tensor.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from lora.config import ConfigError, TrainConfig
from lora.model import load_components
from lora.train.data.cache import ENCODE_BATCH, CachedItems, build_cache, train_cache_root
from lora.train.data.plan import DataPlan
from lora.train.distributed import launched_rank
from lora.train.errors import TrainingError
from lora.train.speed.compile import expandable_segments_reason, use_expandable_segments
from lora.train.step.inputs import TextSource
from lora.train.step.runner import StepRunner

from .accelerator import make_accelerator, mixed_precision, weight_dtype
from .lora import setup_lora_unet, setup_text_encoder_lora
from .optimizer import make_optimizer, make_scheduler
from .phases import PhaseClock


@dataclass
class TrainingSetup:
    """The parts of one segment: models, caches, trainable weights and the step runner (which
    owns the optimizer's learning rate)."""

    cfg: TrainConfig
    plan: DataPlan
    #: the precision in effect ("no", "fp16", "bf16")
    mp: str
    accelerator: object
    device: torch.device
    is_main: bool
    world: int
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    train_cache: CachedItems
    val_cache: CachedItems
    #: every trained tensor by its checkpoint name (``unet.…``, ``text_encoder.…``)
    trainable: dict[str, torch.nn.Parameter]
    runner: StepRunner
    tokenizer: object = None
    #: kept on the CPU only where samples are drawn while training (lora/train/samples.py);
    #: None elsewhere: a step needs no VAE
    vae: torch.nn.Module | None = None
    #: seconds of each part of the set-up (model load, latent cache, ...), in the order they ran
    setup_seconds: dict[str, float] | None = None


def set_up(cfg: TrainConfig, plan: DataPlan) -> TrainingSetup:
    """Load the base model, build the caches, attach LoRA and make optimizer, schedule and runner."""
    clock = PhaseClock()
    mp = mixed_precision(cfg)
    # cpu=True lets accelerate form a gloo process group when launched on a machine without CUDA
    accelerator = make_accelerator(mp, cpu=not torch.cuda.is_available())
    launched = launched_rank()[1]
    if launched != accelerator.num_processes:  # never train N independent copies
        raise TrainingError(f"launched as {launched} processes but accelerate formed a group of "
                            f"{accelerator.num_processes}; start with `accelerate launch` or torchrun")
    device = accelerator.device
    card_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    why = expandable_segments_reason(cfg.speed.low_memory, card_gib, os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    if why:
        use_expandable_segments(why)  # before the first model tensor reaches the card
    clock.mark("accelerator")
    # each part as its files store it: the one cast happens on the card (fp16 files loaded as
    # fp32 made the CPU widen every UNet weight first, on the one thread a GPU run uses)
    comps = load_components(cfg.model, dtype=None, device="cpu")
    clock.mark("load_model")
    comps.vae.to(device, torch.float32)  # the latent cache is encoded in fp32, as before
    comps.text_encoder.to(device, torch.float32)
    # on a card, the first tensor there also starts CUDA's context and loads its libraries:
    # a part of its own in the set-up's record, apart from reading the model's files
    clock.mark("encoders_to_device")
    live_text = cfg.caption_shuffle or cfg.train_text_encoder
    train_cache, val_cache = _caches(cfg, plan, comps, accelerator)
    clock.mark("latent_cache")
    comps.vae.to("cpu")
    # a step runs only the UNet (and the text encoder when captions change); the VAE stays, on
    # the CPU, only where it decodes samples drawn while training
    vae = comps.vae if cfg.samples.enabled and accelerator.is_main_process else None
    comps.vae = None
    if not live_text:
        comps.text_encoder.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    clock.mark("encoders_off")
    dtype = weight_dtype(mp)
    try:
        trainable = setup_lora_unet(cfg, comps.unet, device, dtype)
    except ValueError as exc:  # e.g. target modules that the UNet does not have
        raise ConfigError(f"invalid training config: {exc}") from None
    groups = [{"params": list(trainable.values()), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        te_trainable = setup_text_encoder_lora(cfg, comps.text_encoder, device, dtype)
        trainable.update(te_trainable)
        groups.append({"params": list(te_trainable.values()), "lr": cfg.text_encoder_lr or cfg.learning_rate})
    clock.mark("unet_lora")
    optimizer = make_optimizer(cfg, groups)
    # evaluation_mode: autocast without a DDP wrapper; several processes average gradients
    # themselves, between the CUDA graphs (lora/train/distributed.py)
    unet = accelerator.prepare_model(comps.unet, evaluation_mode=True)
    optimizer = accelerator.prepare_optimizer(optimizer)
    lr_scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
    text_for = TextSource(cfg, train_cache, [i.caption for i in plan.train_items], tokenizer=comps.tokenizer,
                          text_encoder=comps.text_encoder, autocast=accelerator.autocast, device=device)
    runner = StepRunner(cfg, accelerator, unet, optimizer, lr_scheduler, comps.noise_scheduler,
                        list(trainable.values()), train_cache, text_for, total_steps=plan.total_steps)
    clock.mark("optimizer_runner")
    return TrainingSetup(cfg, plan, mp, accelerator, device, accelerator.is_main_process, accelerator.num_processes,
                         unet, comps.text_encoder, comps.noise_scheduler, train_cache, val_cache, trainable, runner,
                         tokenizer=comps.tokenizer, vae=vae, setup_seconds=clock.seconds)


def _caches(cfg: TrainConfig, plan: DataPlan, comps, accelerator) -> tuple[CachedItems, CachedItems]:
    """The training and validation images' latents and caption embeddings (one process encodes,
    the others read the cache)."""
    cache_root = train_cache_root(plan.dataset_dir, cfg.cache_dir)
    common = dict(root=cache_root, model_id=comps.model_id, vae=comps.vae, text_encoder=comps.text_encoder,
                  tokenizer=comps.tokenizer, resolution=cfg.resolution, device=accelerator.device,
                  encode_batch=1 if cfg.speed.low_memory else ENCODE_BATCH)
    with accelerator.main_process_first():
        train_cache = build_cache(plan.train_items, plan.train_buckets, flip=cfg.flip, **common)
        val_cache = build_cache(plan.val_items, plan.val_buckets, flip=False, **common)
    return train_cache, val_cache
