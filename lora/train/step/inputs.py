"""A step's inputs on the device: the seeded draws, the cached latents and the text, staged early.

All draws of step ``n`` come from one CPU generator seeded by (seed, n), drawn per sample in
the step's order. Splitting a step into smaller micro-batches (the OOM fallback) therefore
slices the same numbers: the effective batch and its noise stay the same. The inputs are a pure
function of (seed, step, batches, divisor, rank), so :class:`StepInputs` may build the next
step's while the GPU still runs this one.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lora.config import TrainConfig
from lora.train.data.batching import split_micro_batches
from lora.train.data.cache import CachedItems, encode_prompts
from lora.train.distributed import rank_share
from lora.train.seeds import derive_seed, generator

log = logging.getLogger(__name__)

#: one micro-batch on the device: (latents, noise, timesteps, encoder hidden states)
MicroInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: ``text_for(indices, caption_rng)``: the encoder hidden states of a micro-batch on the device
TextFor = Callable[[list[int], random.Random], torch.Tensor]


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the GPU.

    A copy from ordinary (pageable) memory can block until the GPU has finished the work
    queued before it; from page-locked memory it is queued like a kernel."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def stack_to_device(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.stack(parts).to(device)``, stacked straight into page-locked memory on CUDA."""
    if torch.device(device).type != "cuda":
        return torch.stack(parts).to(device)
    buf = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
    torch.stack(parts, out=buf)
    return buf.to(device, non_blocking=True)


def _batches_key(batches: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(b) for b in batches)


class TextSource:
    """The text a micro-batch trains on: the cached embeddings, or its captions encoded now.

    Why encoded now: caption shuffling changes the text every step, and a trained text encoder
    must run inside the step's autograd graph (lora/train/data/cache.py keeps the unshuffled
    embeddings for validation)."""

    def __init__(self, cfg: TrainConfig, cache: CachedItems, captions: Sequence[str], *, tokenizer, text_encoder,
                 autocast: Callable, device: torch.device) -> None:
        self.cfg, self.cache, self.captions = cfg, cache, list(captions)
        self.tokenizer, self.text_encoder, self.autocast, self.device = tokenizer, text_encoder, autocast, device
        self.live = cfg.caption_shuffle or cfg.train_text_encoder

    def __call__(self, indices: list[int], captions_rng: random.Random) -> torch.Tensor:
        if not self.live:
            return stack_to_device([self.cache.text[i] for i in indices], self.device)
        captions = []
        for i in indices:
            caption = self.captions[i]
            if self.cfg.caption_shuffle:
                caption = shuffle_caption(caption, self.cfg.keep_tokens, captions_rng)
            captions.append(caption)
        if self.cfg.train_text_encoder:
            with self.autocast():
                return encode_prompts(self.tokenizer, self.text_encoder, captions, self.device).float()
        with torch.no_grad():
            return encode_prompts(self.tokenizer, self.text_encoder, captions, self.device).float()


class StepInputs:
    """This process's micro-batches of a step on the device, and the next step's, staged early."""

    def __init__(self, cfg: TrainConfig, cache: CachedItems, text_for: TextFor, *, num_train_timesteps: int,
                 device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.cache, self.text_for = cfg, cache, text_for
        self.num_train_timesteps, self.device, self.rank, self.world = num_train_timesteps, device, rank, world
        #: the next step's inputs, prepared while the GPU ran the step before (:meth:`stage`)
        self._staged: tuple[tuple, list[MicroInputs]] | None = None

    def build(self, step_number: int, batches: list[list[int]], divisor: int) -> list[MicroInputs]:
        """This process's micro-batches of step ``step_number`` on the device: (latents, noise,
        timesteps, text). Pure function of (seed, step, batches, divisor, rank): staging it one
        step early changes nothing."""
        cfg, cache = self.cfg, self.cache
        flat = [i for b in batches for i in b]
        draws = draw_step(cfg.seed, step_number, [cache.latents[i].shape for i in flat],
                          num_train_timesteps=self.num_train_timesteps,
                          noise_offset=cfg.noise_offset, flip=cfg.flip)
        out: list[MicroInputs] = []
        pos = 0
        for whole in split_micro_batches(batches, divisor):
            start, end = rank_share(len(whole), self.rank, self.world)
            micro, first = whole[start:end], pos + start
            pos += len(whole)
            if not micro:  # more processes than images in this micro-batch
                continue
            sl = slice(first, first + len(micro))
            lat = stack_to_device([
                cache.latents_flip[i] if (cache.latents_flip and draws.flip[first + k]) else cache.latents[i]
                for k, i in enumerate(micro)
            ], self.device)
            noise = stack_to_device(draws.noise[sl], self.device)
            t = to_device(draws.timesteps[sl], self.device)
            ehs = self.text_for(micro, draws.caption_rng)
            out.append((lat, noise, t, ehs))
        return out

    def stage(self, step_number: int, batches: list[list[int]], divisor: int = 1) -> None:
        """Prepare step ``step_number``'s inputs now, while the GPU still runs the step before.

        Why: every step ends by reading its loss on the host, so without staging the GPU waits
        for the host to draw the next step's noise, stack the cached latents and copy them over
        (measured on an H200: 31.5 ms of kernels in a 34.9 ms batch-4 step). The draws are the
        same numbers either way (seeded by step), so staging changes nothing that is trained.
        A failure here is dropped: the step then builds its inputs itself and reports it.
        """
        self._staged = None
        if self.cfg.train_text_encoder:  # its forward belongs to the step's own autograd graph
            return
        try:
            key = (step_number, _batches_key(batches), divisor)
            self._staged = (key, self.build(step_number, batches, divisor))
        except Exception as exc:  # noqa: BLE001 - the step itself will try again and raise
            log.debug("could not stage step %d: %s", step_number, exc)

    def take(self, step_number: int, batches: list[list[int]], divisor: int) -> list[MicroInputs]:
        """The step's inputs: the staged ones when they are this step's, else built now."""
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == (step_number, _batches_key(batches), divisor):
            return staged[1]
        return self.build(step_number, batches, divisor)
