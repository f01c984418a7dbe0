"""Per-step randomness and the loss weighting of diffusion training.

All draws of step ``n`` come from one CPU generator seeded by (seed, n), drawn per sample in
the step's order. Splitting a step into smaller micro-batches (the OOM fallback) therefore
slices the same numbers: the effective batch and its noise stay the same.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .seeds import derive_seed, generator


@dataclass
class StepDraws:
    timesteps: torch.Tensor  # (n,) long
    noise: list[torch.Tensor]  # per sample, shape of its latent
    flip: list[bool]
    caption_rng: random.Random


def draw_step(
    seed: int,
    step: int,
    shapes: Sequence[torch.Size],
    *,
    num_train_timesteps: int,
    noise_offset: float,
    flip: bool,
) -> StepDraws:
    """Timesteps, noise (with offset), flips and a caption RNG for optimizer step ``step``."""
    g = generator(seed, "step", step)
    n = len(shapes)
    timesteps = torch.randint(0, num_train_timesteps, (n,), generator=g, dtype=torch.long)
    flips = (torch.rand(n, generator=g) < 0.5).tolist() if flip else [False] * n
    noise = []
    for shape in shapes:
        eps = torch.randn(tuple(shape), generator=g)
        if noise_offset:
            eps = eps + noise_offset * torch.randn((shape[0], 1, 1), generator=g)
        noise.append(eps)
    return StepDraws(timesteps, noise, flips, random.Random(derive_seed(seed, "caption", step)))


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption: the first ``keep_tokens`` comma-separated tags stay in place."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1-ᾱ) of each timestep.

    The same quantity as ``diffusers.training_utils.compute_snr``, which is not used here
    because it computes it as (√ᾱ/√(1-ᾱ))²: two square roots and a square round differently,
    so about two thirds of the timesteps would get a weight a few 1e-7 apart, and min-SNR runs
    would no longer give the bits that runs made before gave (tests/train/test_train_diffusers_helpers.py).
    """
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def loss_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None, prediction_type: str
) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al. 2023); None when disabled."""
    if not gamma:
        return None
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction!r}")
