"""Fixtures for the data-processing tests: generated pictures and encoders (no network)."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw


def make_picture(seed: int, size: tuple[int, int] = (640, 512)) -> Image.Image:
    """A structured RGB picture (gradient + shapes), distinct per seed, phash-stable under
    re-encoding and mild resizing, like a real illustration and unlike noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c0, c1, c2 = rng.integers(0, 256, size=(3, 3))
    arr = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def picture() -> Callable[..., Image.Image]:
    return make_picture


@pytest.fixture
def encoded() -> Callable[..., bytes]:
    return encode
