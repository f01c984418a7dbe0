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

from lora.train.data.fitting import fitting_batches
from lora.train.seeds import generator
from lora.train.step.loss import target_for

log = logging.getLogger(__name__)


#: Held-out images scored per UNet call (each with all its timesteps), among images of one
#: latent shape. Why: a run validates at step 0 and after every epoch, so the guide's 20
#: epochs score 50 images 21 times; one eager UNet call per image took about 44 s of a
#: 20-epoch run on an H200, four per call 27.8 s. But the largest call is what a run holds
#: above its CUDA graphs: four images (20 rows) at 704x576 use 1.96 GiB, two 0.98 GiB
#: (bench/validation_memory.py); a default run held 8.57 GiB at its peak with four, 8.08 with
#: two (H100s; the rest is the allocator's caching, which expandable segments return on small
#: cards: lora/train/speed/compile.py). Interpolated cost: ~5 s more a run (~5.4 s of the
#: 27.8 s is the calls' own overhead). An out-of-memory error halves it; ``low_memory`` scores
#: one at a time.
IMAGES_PER_CALL = 2


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
    images_per_call: int = IMAGES_PER_CALL,
    on_smaller: Callable[[int], None] | None = None,
) -> dict | None:
    """``{"loss": mean, "per_timestep": {"100": ...}, "per_image": {name: [loss at each
    timestep, in the order of "timesteps"]}, "timesteps": [...]}`` or None without held-out
    images.

    Each UNet call takes up to ``images_per_call`` images of one latent shape, each with all
    its timesteps; an image's noise and loss do not depend on which images share its call.
    Out of memory, the calls get smaller and ``on_smaller`` hears the new size (the trainer
    starts the next evaluation there instead of failing again each epoch).
    """
    if not latents or not timesteps:
        return None
    was_training = unet.training
    unet.eval()
    # cuDNN's heuristics, not its benchmark: the benchmark times every convolution again for
    # each new (images x timesteps, shape) batch; on an H200 the 21 validations of a 20-epoch
    # run took 35.0 s with it, 27.8 s without, and its trial workspaces 0.5 GiB more memory
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    n_t = len(timesteps)
    losses: list[torch.Tensor | None] = [None] * len(latents)  # (n_t,) per image, on the device
    try:
        t = torch.tensor(list(timesteps), dtype=torch.long)

        def score(group: list[int]) -> torch.Tensor:
            return _score(unet, noise_scheduler, group, latents, text, names, t, device, autocast)

        for group, per in fitting_batches(_same_shape_groups(latents), images_per_call, score, device=device,
                                          what="scoring validation images", on_smaller=on_smaller):
            for j, i in enumerate(group):
                losses[i] = per[j * n_t:(j + 1) * n_t].double()
    finally:
        unet.train(was_training)
        torch.backends.cudnn.benchmark = benchmark
    table = torch.stack(losses).cpu()  # one read-back for the whole evaluation  # type: ignore[arg-type]
    per_image = {name: [float(v) for v in row.tolist()] for name, row in zip(names, table)}
    means = table.mean(dim=0).tolist()
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


def _score(unet, noise_scheduler, group: list[int], latents, text, names, t: torch.Tensor, device,
           autocast) -> torch.Tensor:
    """One UNet call: every image of ``group`` (one latent shape) at every timestep of ``t``;
    the loss of each (image, timestep), image-major, on the device."""
    n_t = len(t)
    x0s, noises, hiddens = [], [], []
    for i in group:
        lat = latents[i]
        g = generator(0, f"validation:{names[i]}")
        noises.append(torch.randn((n_t, *lat.shape), generator=g))
        x0s.append(lat.unsqueeze(0).expand(n_t, *lat.shape))
        hiddens.append(text[i].unsqueeze(0).expand(n_t, *text[i].shape))
    x0, noise = torch.cat(x0s).to(device), torch.cat(noises).to(device)
    td = t.repeat(len(group)).to(device)
    noisy = noise_scheduler.add_noise(x0, noise, td)
    ehs = torch.cat(hiddens).to(device)
    with autocast():
        pred = unet(noisy, td, ehs, return_dict=False)[0]
    target = target_for(noise_scheduler, x0, noise, td)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _same_shape_groups(latents: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``latents`` grouped by shape, in first-seen order."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, lat in enumerate(latents):
        by_shape.setdefault(tuple(lat.shape), []).append(i)
    return list(by_shape.values())


def has_base_record(log_data: dict) -> bool:
    """Whether the log already holds the step-0 (base model) validation record."""
    return any(v.get("step") == 0 for v in log_data.get("validation") or [])
