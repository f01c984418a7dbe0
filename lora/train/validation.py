"""Validation loss on held-out images at fixed timesteps with fixed noise.

Per-step training loss uses random timesteps and carries little signal; this measure uses
the same images, the same timesteps (default 100/300/500/700/900) and the same noise every
time, so two points of one run, and two runs on the same split, are directly comparable.
The noise depends only on the image's name and the timestep (not on the run seed).

Each record also keeps the loss of every image at every timestep (``per_image``), so two runs
(or a run and its own step 0, the base model) can be compared image by image on the images
they share (lora/analysis/paired.py) instead of by two means over different images.
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
    """``{"loss": mean, "per_timestep": {"100": ...}, "per_image": {name: [loss at each
    timestep, in the order of "timesteps"]}, "timesteps": [...]}`` or None without held-out
    images.

    Each image is one UNet call over a batch of all timesteps.
    """
    if not latents or not timesteps:
        return None
    was_training = unet.training
    unet.eval()
    sums = torch.zeros(len(timesteps), dtype=torch.float64)
    per_image: dict[str, list[float]] = {}
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
            per = per.double().cpu()
            sums += per
            per_image[name] = [float(v) for v in per.tolist()]
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
        "timesteps": [int(ts) for ts in timesteps],
        "per_image": per_image,
    }


def has_base_record(log_data: dict) -> bool:
    """Whether the log already holds the step-0 (base model) validation record."""
    return any(v.get("step") == 0 for v in log_data.get("validation") or [])
