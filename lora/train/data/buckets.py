"""Aspect-ratio buckets and per-bucket image preparation (resize to cover, centre crop).

The bucket list itself comes from ``lora.data.images.make_buckets`` (kohya's rule: area at
most resolution², sides in steps); this module picks the step for a training resolution and
turns an image into the tensor the VAE encodes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lora.data.images import make_buckets, nearest_bucket

Bucket = tuple[int, int]  # (width, height)

_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


def bucket_step(resolution: int) -> int:
    """64 px like kohya for real resolutions; 16 px for tiny ones (the tiny UNet needs x16)."""
    return 64 if resolution >= 256 else 16


def buckets_for(resolution: int) -> list[Bucket]:
    step = bucket_step(resolution)
    min_side = max(step, (resolution // 2) // step * step)
    return make_buckets(resolution, min_side=min_side, max_side=resolution * 2, step=step)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as the image will be seen (EXIF rotation applied), header only."""
    with Image.open(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - broken EXIF: take the stored size
            orientation = None
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def assign_bucket(path: Path, buckets: list[Bucket]) -> Bucket:
    w, h = image_size(path)
    return nearest_bucket(w, h, buckets)


def load_for_bucket(path: Path, bucket: Bucket) -> torch.Tensor:
    """RGB image resized to cover ``bucket`` and centre-cropped: float tensor (3, H, W) in [-1, 1]."""
    bw, bh = bucket
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                img = canvas
            else:
                img = img.convert("RGB")
        w, h = img.size
        scale = max(bw / w, bh / h)
        nw, nh = max(bw, math.ceil(w * scale)), max(bh, math.ceil(h * scale))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - bw) // 2, (nh - bh) // 2
        img = img.crop((left, top, left + bw, top + bh))
        arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0
