"""Artifact helpers: images embedded so the UI draws them, paths as text, sizes people read."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from lora.fsutil import human_size
from tasks.artifacts import (
    INLINE_MAX_BYTES,
    INLINE_MAX_SIDE,
    inline_image,
    inline_relative_images,
    path_text,
)

DATA_URI = re.compile(r"^!\[(?P<alt>[^\]]*)\]\(data:(?P<mime>image/[a-z]+);base64,(?P<data>[A-Za-z0-9+/=]+)\)$")


def _decode(markdown: str) -> tuple[str, str, Image.Image]:
    match = DATA_URI.match(markdown)
    assert match, markdown[:200]
    image = Image.open(io.BytesIO(base64.b64decode(match["data"])))
    image.load()
    return match["alt"], match["mime"], image


def test_small_png_is_embedded_unchanged(tmp_path):
    path = tmp_path / "plot.png"
    Image.new("RGB", (64, 32), (200, 10, 10)).save(path)
    alt, mime, image = _decode(inline_image(path, "loss curve"))
    assert (alt, mime, image.size) == ("loss curve", "image/png", (64, 32))
    assert base64.b64decode(DATA_URI.match(inline_image(path, "x"))["data"]) == path.read_bytes()


def test_big_grid_is_scaled_down_to_open_quickly(tmp_path):
    path = tmp_path / "grid.png"
    noise = np.random.default_rng(0).integers(0, 255, (2048, 1536, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    assert path.stat().st_size > INLINE_MAX_BYTES
    markdown = inline_image(path, "samples grid")
    _, mime, image = _decode(markdown)
    assert mime == "image/jpeg" and max(image.size) == INLINE_MAX_SIDE
    assert image.size[0] / image.size[1] == 1536 / 2048
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the file itself is untouched


def test_relative_report_images_are_inlined_in_place(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "loss_curve.png")
    text = "# Report\n\n![loss curve](loss_curve.png)\n\n![gone](missing.png)\n"
    out = inline_relative_images(text, tmp_path)
    assert "](loss_curve.png)" not in out and "![loss curve](data:image/png;base64," in out
    assert "![gone](missing.png)" in out  # nothing to embed: left as written


def test_paths_are_text_and_sizes_readable(tmp_path):
    assert path_text(tmp_path / "a b.safetensors") == f"`{(tmp_path / 'a b.safetensors').resolve()}`"
    assert human_size(512) == "512 B"
    assert human_size(3 * 1024 * 1024 + 1) == "3.0 MiB"  # the units the CLI prints too
