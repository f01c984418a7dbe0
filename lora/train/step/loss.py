"""The one loss every step path trains on, and the loss weighting of diffusion training.

:class:`StepLoss` is handed to the step executors (lora/train/step/executor.py, graphed.py),
which call it per micro-batch; the runner replaces its ``forward`` when a compiled UNet fails.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lora.train.speed.compile import attention_context


class StepLoss:
    """A micro-batch's share of the step's mean loss (diffusion MSE, min-SNR weighted)."""

    def __init__(self, noise_scheduler, forward: Callable, *, autocast: Callable, attention: str,
                 min_snr_gamma: float | None, device: torch.device) -> None:
        self.noise_scheduler, self.autocast, self.attention = noise_scheduler, autocast, attention
        #: the UNet forward: the module itself, or compiled / channels-last (lora/train/speed/compile.py)
        self.forward = forward
        self.min_snr_gamma = min_snr_gamma
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    def __call__(self, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor,
                 n_total: "int | torch.Tensor", sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``sample_weight`` (CUDA graphs' padded micro-batches): 1 per image, 0 per padding row,
        so padding adds exactly nothing to the loss or the gradients."""
        noisy = self.noise_scheduler.add_noise(lat, noise, t)
        with self.autocast(), attention_context(self.attention):
            pred = self.forward(noisy, t, ehs, return_dict=False)[0]
        target = target_for(self.noise_scheduler, lat, noise, t)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = loss_weights(self.alphas_cumprod, t, self.min_snr_gamma,
                               self.noise_scheduler.config.prediction_type)
        if weights is not None:
            per = per * weights
        if sample_weight is not None:
            per = per * sample_weight
        return per.sum() / n_total  # the step's mean, however it is split


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
