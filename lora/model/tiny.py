"""The built-in tiny SD1.5-shaped model (``--model tiny``).

Why: tests, the demo and CI must train, resume, export and sample on 2 CPU cores in
seconds, through exactly the code path used for the real model (diffusers
``from_pretrained`` on a pipeline folder). So we build a full diffusers-format
StableDiffusionPipeline folder with deterministic random weights, once, and cache it.

Shapes (all SD1.5 layouts, just narrow):
- UNet2DConditionModel: down (CrossAttnDownBlock2D, DownBlock2D), up (UpBlock2D,
  CrossAttnUpBlock2D), block_out_channels (32, 64), 1 layer per block, cross-attention
  dim 32. Module names follow SD1.5 (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``),
  so LoRA key names look like the real ones.
- AutoencoderKL: 4 latent channels, 4 blocks -> downscale factor 8 like SD1.5
  (``TINY_VAE_SCALE_FACTOR``), scaling_factor 0.18215. At ``TINY_RESOLUTION`` = 64 px the
  UNet sees 8x8 latents, which keeps a training step far under a second on CPU. Training
  resolutions must be multiples of 16 (VAE factor 8 x one UNet downsample).
- CLIPTextModel: hidden 32, 2 layers, 4 heads, 77 positions, with the generated tokenizer.
- DDPMScheduler with SD1.5's training schedule.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from lora.fsutil import make_temp_dir

TINY_MODEL_NAME = "tiny-sd15-v1"
TINY_RESOLUTION = 64  # recommended training/sampling size in pixels
TINY_VAE_SCALE_FACTOR = 8
TINY_SEED = 1234

SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def default_cache_root() -> Path:
    """``$ANIMELORA_CACHE`` or ``~/.cache/animelora``."""
    env = os.environ.get("ANIMELORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "animelora"


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / ".complete").is_file()


def ensure_tiny_model(root: Path | None = None) -> Path:
    """Return the tiny pipeline folder under ``root`` (default cache), building it once.

    The build happens in a temporary sibling folder that is renamed into place, so a
    crash or a concurrent builder never leaves a half-written model behind.
    """
    root = Path(root) if root is not None else default_cache_root()
    target = root / TINY_MODEL_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, f".{TINY_MODEL_NAME}-")  # readable by other users, like the rest of the cache
    try:
        build_tiny_pipeline_folder(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # leftover of an older, broken layout
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # someone else won the race only if theirs is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_pipeline_folder(folder: Path) -> None:
    """Create the models with fixed seeds and ``save_pretrained`` them into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer_assets import BOS_TOKEN, EOS_TOKEN, MAX_LENGTH, write_tokenizer

    tok_dir = folder / "_tokenizer_src"
    vocab = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // TINY_VAE_SCALE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(TINY_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=32,
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
        )
    )
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # Keep the hand-written vocab.json/merges.txt as the tokenizer's source of truth.
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # like SD1.5: vocab.json + merges.txt only
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tok_dir / name, folder / "tokenizer" / name)
    shutil.rmtree(tok_dir)
    info = {
        "name": TINY_MODEL_NAME,
        "resolution": TINY_RESOLUTION,
        "vae_scale_factor": TINY_VAE_SCALE_FACTOR,
        "seed": TINY_SEED,
        "note": "random weights; for tests and demos only",
    }
    (folder / "animelora_tiny.json").write_text(json.dumps(info, indent=2))


def state_dict_digest(module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, bytes) — for determinism checks."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
