"""On-disk cache of VAE latents and text embeddings, so a training step runs only the UNet.

Layout, under ``<cache root>/<model key>/`` (the cache root: :func:`train_cache_root`)::

    latents-r<resolution>/<image sha256>-<W>x<H>.safetensors   {"latent", "latent_flip"?}
    text/<caption sha256>.safetensors                          {"hidden"}

Keys are content hashes, so one entry serves every data-set version (a refresh only
encodes new images) and every run on the same base model; a changed image or caption gets a
new key. The latent is the VAE posterior *mean* times the scaling factor (deterministic,
so a cache rebuilt elsewhere is identical); with ``flip`` the mirrored image is encoded too.

Caption shuffling (and text-encoder training) changes the text input every step, so those
runs encode captions on the fly instead (the frozen CLIP encoder is cheap next to the UNet);
the cached embedding of the unshuffled caption is still used for validation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save

from lora.datapaths import DatasetPaths
from lora.fsutil import atomic_write_bytes, file_digest
from lora.progress import Progress

from .buckets import Bucket
from .dataset import Item
from .fitting import fitting_batches
from .prefetch import PreparedImages, threaded_map

log = logging.getLogger(__name__)
#: Images per VAE encode while building the latent cache. The fp32 VAE at 512 px holds about
#: 1.7 GiB of activations per image (an H200 reserved 14.6 GiB at 8, 1.7 GiB at 1, the text
#: encoder included), so the batch halves on an out-of-memory error until it fits
#: (:class:`LatentEncoder`) and ``low_memory`` starts at 1.
ENCODE_BATCH = 8
#: Environment variable naming the folder of every animelora cache (the tiny model too).
CACHE_ENV = "ANIMELORA_CACHE"


def _writable(folder: Path) -> bool:
    """Whether ``folder`` (or its nearest existing parent) can take new files."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def _workspace_of(dataset_dir: Path) -> Path | None:
    """The workspace a data set lives in (``<ws>/datasets/<name>``), or None."""
    return DatasetPaths(dataset_dir).workspace


def train_cache_root(dataset_dir: Path | str, cache_dir: Path | str | None = None) -> Path:
    """Where the latent and text-embedding caches of a run on ``dataset_dir`` go.

    Never inside the data set, which may be read-only (a shared mount, a Kaggle input) and is
    not the trainer's to change. In order: ``cache_dir`` (the ``cache_dir`` setting);
    ``$ANIMELORA_CACHE/train``; ``<workspace>/cache/train`` for a data set of a workspace
    (``<workspace>/datasets/<name>``) whose folder is writable; else the user's cache,
    ``~/.cache/animelora/train`` (beside the tiny model). Entries are keyed by content and
    model, so one cache serves every data set and run.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "train"
    workspace = _workspace_of(Path(dataset_dir).expanduser().resolve())
    if workspace is not None and _writable(workspace / "cache"):
        return workspace / "cache" / "train"
    return Path.home() / ".cache" / "animelora" / "train"


def compiled_code_root(dataset_dir: Path | str, cache_dir: Path | str | None = None) -> Path:
    """Where compiled GPU code of a run on ``dataset_dir`` is kept: ``compile/`` (torch.compile's
    caches) and ``cuda/`` (the CUDA driver's run-time kernels) under it.

    Beside the latent cache (``<workspace>/cache``, ``$ANIMELORA_CACHE``, ``~/.cache/animelora``),
    so a new session on the same workspace starts warm; with ``cache_dir`` set, inside that
    folder, never beside it: the user named that folder, not its parent."""
    root = train_cache_root(dataset_dir, cache_dir)
    return root if cache_dir else root.parent


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file: the cache key of an image."""
    return file_digest(path, "sha256")


def model_key(model_id: str, vae_config: dict, text_config: dict) -> str:
    """Readable model name plus a hash of the id and the encoders' configs."""
    blob = json.dumps([model_id, vae_config, text_config], sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_id).name or model_id)[:40]
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # No fsync: a damaged entry is detected on load and re-encoded. Serialised here rather than
    # by save_file, which creates its file private (0600): a shared cache follows the umask.
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}), fsync=False)


def _load(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The entry, or None when missing, damaged or lacking a key (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        data = load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged cache entry is simply recomputed
        log.warning("cache entry %s is damaged; re-encoding", path.name)
        return None
    return data if all(k in data for k in keys) else None


def encode_prompts(tokenizer, text_encoder, captions: Sequence[str], device) -> torch.Tensor:
    """CLIP last hidden state for each caption, padded to the tokenizer's max length."""
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids, return_dict=False)[0]


@dataclass
class CachedItems:
    """Per-item tensors on the CPU, aligned with the item list they were built from."""

    latents: list[torch.Tensor]
    latents_flip: list[torch.Tensor] | None
    text: list[torch.Tensor]
    hits: int = 0
    misses: int = 0


class LatentEncoder:
    """The VAE posterior mean of a batch of images, in batches that fit the card.

    Why: a user's card is not ours. An out-of-memory error cuts the batch smaller (halved,
    down to one image; lora/train/data/fitting.py) and :attr:`batch` keeps the new size for the rest
    of the cache, so an 8 GB card builds the same cache an H200 does instead of failing at set-up.
    """

    def __init__(self, vae, device, scaling: float, batch: int = ENCODE_BATCH) -> None:
        self.vae, self.device, self.scaling = vae, device, scaling
        self.dtype = next(vae.parameters()).dtype
        self.batch = max(1, int(batch))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents (fp32, on the CPU) of ``pixels`` (N, 3, H, W in [-1, 1])."""
        batches = fitting_batches([range(len(pixels))], self.batch, lambda idx: self._encode(pixels[idx]),
                                  device=self.device, what="encoding images for the latent cache",
                                  on_smaller=self._fits)
        return torch.cat([latents for _, latents in batches])

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        on_device = pixels.to(self.device, self.dtype)
        return self.vae.encode(on_device).latent_dist.mean.float().cpu() * self.scaling

    def _fits(self, batch: int) -> None:
        self.batch = batch


@torch.no_grad()
def build_cache(
    items: Sequence[Item],
    buckets: Sequence[Bucket],
    *,
    root: Path,
    model_id: str,
    vae,
    text_encoder,
    tokenizer,
    resolution: int,
    flip: bool,
    device,
    on_progress: Callable[[int, int], None] | None = None,
    encode_batch: int = ENCODE_BATCH,
) -> CachedItems:
    """Load every item's latents and caption embedding, encoding only what is not cached yet.

    ``encode_batch``: images per VAE encode to start with (halved on out-of-memory)."""
    key = model_key(model_id, dict(vae.config), text_encoder.config.to_dict())
    base = Path(root) / key
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    latent_keys = ["latent", "latent_flip"] if flip else ["latent"]
    n = len(items)
    latents: list[torch.Tensor | None] = [None] * n
    flips: list[torch.Tensor | None] = [None] * n
    text: list[torch.Tensor | None] = [None] * n
    hits = misses = 0

    # Latents: look up, then encode the misses bucket by bucket in small batches.
    todo: dict[Bucket, list[tuple[int, Path]]] = {}
    digests = threaded_map(file_sha256, [item.image for item in items])  # reading files: threads overlap
    for i, (digest, bucket) in enumerate(zip(digests, buckets)):
        path = base / f"latents-r{resolution}" / f"{digest}-{bucket[0]}x{bucket[1]}.safetensors"
        entry = _load(path, latent_keys)
        if entry is not None:
            latents[i] = entry["latent"]
            flips[i] = entry.get("latent_flip")
            hits += 1
        else:
            todo.setdefault(tuple(bucket), []).append((i, path))
            misses += 1
    encoder = LatentEncoder(vae, device, scaling, batch=encode_batch)
    done = 0
    # the images in the order they are encoded, prepared on threads while the VAE works
    jobs = [(items[i].image, bucket) for bucket, entries in todo.items() for i, _ in entries]
    with PreparedImages(jobs) as prepared, Progress(misses, "caching latents", logger=log) as bar:
        for bucket, entries in todo.items():
            start = 0
            while start < len(entries):
                chunk = entries[start:start + encoder.batch]
                pixels = torch.stack(prepared.take(len(chunk)))
                out = encoder.encode(pixels)
                out_flip = encoder.encode(torch.flip(pixels, dims=[3])) if flip else None
                for j, (i, path) in enumerate(chunk):
                    tensors = {"latent": out[j].clone()}
                    if out_flip is not None:
                        tensors["latent_flip"] = out_flip[j].clone()
                    _save_atomic(tensors, path)
                    latents[i] = tensors["latent"]
                    flips[i] = tensors.get("latent_flip")
                start += len(chunk)
                bar.update(len(chunk))
                done += len(chunk)
                if on_progress:
                    on_progress(done, misses)

    # Text embeddings of the plain captions.
    te_dtype = next(text_encoder.parameters()).dtype
    by_caption: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_caption.setdefault(item.caption, []).append(i)
    missing: list[tuple[str, Path]] = []
    for caption, idxs in by_caption.items():
        path = base / "text" / f"{hashlib.sha256(caption.encode()).hexdigest()}.safetensors"
        entry = _load(path, ["hidden"])
        if entry is None:
            missing.append((caption, path))
            continue
        for i in idxs:
            text[i] = entry["hidden"]
    with Progress(len(missing), "caching text", unit="caption", logger=log) as bar:
        for start in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[start:start + ENCODE_BATCH]
            hidden = encode_prompts(tokenizer, text_encoder, [c for c, _ in chunk], device)
            hidden = hidden.to(te_dtype).float().cpu()
            for j, (caption, path) in enumerate(chunk):
                _save_atomic({"hidden": hidden[j].clone()}, path)
                for i in by_caption[caption]:
                    text[i] = hidden[j].clone()
            bar.update(len(chunk))
    log.info("latent cache %s: %d hit(s), %d encoded", base, hits, misses)
    return CachedItems(
        latents=[t for t in latents],  # type: ignore[misc]
        latents_flip=[t for t in flips] if flip else None,  # type: ignore[misc]
        text=[t for t in text],  # type: ignore[misc]
        hits=hits,
        misses=misses,
    )
