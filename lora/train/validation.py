"""Validation loss on held-out images at fixed timesteps with fixed noise.

Per-step training loss uses random timesteps and carries little signal; this measure uses
the same images, the same timesteps (default 100/300/500/700/900) and the same noise every
time, so two points of one run, and two runs on the same split, are directly comparable.
The noise depends only on the image's name and the timestep (not on the run seed).
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .noise import target_for
from .seeds import generator

log = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(
    unet,
    noise_scheduler,
    latents: Sequence[torch.Tensor],
    text: Sequence[torch.Tensor],
    names: Sequence[str],
    timesteps: Sequence[int],
    device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict | None:
    """``{"loss": mean, "per_timestep": {"100": ...}}`` or None without held-out images.

    Each image is one UNet call over a batch of all timesteps.
    """
    if not latents or not timesteps:
        return None
    was_training = unet.training
    unet.eval()
    sums = torch.zeros(len(timesteps), dtype=torch.float64)
    try:
        t = torch.tensor(list(timesteps), dtype=torch.long)
        for lat, hidden, name in zip(latents, text, names):
            g = generator(0, f"validation:{name}")
            noise = torch.randn((len(timesteps), *lat.shape), generator=g)
            x0 = lat.unsqueeze(0).expand(len(timesteps), *lat.shape).contiguous()
            x0, noise, td = x0.to(device), noise.to(device), t.to(device)
            noisy = noise_scheduler.add_noise(x0, noise, td)
            ehs = hidden.unsqueeze(0).expand(len(timesteps), *hidden.shape).to(device)
            with autocast():
                pred = unet(noisy, td, ehs, return_dict=False)[0]
            target = target_for(noise_scheduler, x0, noise, td)
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            sums += per.double().cpu()
    finally:
        unet.train(was_training)
    means = (sums / len(latents)).tolist()
    mean = float(sum(means) / len(means))
    # the CLI's progress bar shows the last value from this record's ``validation_loss``
    log.info("validation loss %.4f (%d images x %d timesteps)", mean, len(latents), len(timesteps),
             extra={"validation_loss": mean})
    return {
        "loss": mean,
        "per_timestep": {str(ts): float(m) for ts, m in zip(timesteps, means)},
    }
