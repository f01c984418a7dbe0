"""Fixtures for the data-pipeline tests: workspaces, generated images, a loopback Danbooru."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (640, 640), mode: str = "RGB") -> Image.Image:
    """A distinct picture per seed (coarse random blocks, so phashes differ clearly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)
    return img.convert(mode) if mode != "RGB" else img


def save_image(path: Path, seed: int, size=(640, 640), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(seed, size).save(path, format=fmt)
    return path


def near_copy(src: Path, dest: Path, scale: float = 0.9) -> Path:
    """A re-encoded, resized copy: different bytes, same picture."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    buf = io.BytesIO()
    img.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=88)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())
    return dest


class ImageKit:
    """Image helpers handed to tests as a fixture (test modules cannot import conftest)."""

    noise = staticmethod(noise_image)
    save = staticmethod(save_image)
    near_copy = staticmethod(near_copy)


@pytest.fixture()
def img() -> type[ImageKit]:
    return ImageKit


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture()
def booru_factory():
    """Start FakeDanbooru servers for one test; all are stopped afterwards."""
    from lora.testing.fakebooru import FakeDanbooru

    started = []

    def start(posts, **kwargs):
        server = FakeDanbooru(posts, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture()
def fetch(workspace):
    """``refresh_dataset`` with test-friendly defaults (fast rate, tiny retry back-off)."""
    from lora.data.refresh import QuerySpec, refresh_dataset

    def run(server, tags="status:any", dataset="d", queries=None, **kwargs):
        specs = queries or [QuerySpec("default", tags)]
        kwargs.setdefault("ratings", ("g", "s", "q", "e"))
        kwargs.setdefault("requests_per_second", 10)
        kwargs.setdefault("backoff_base", 0.01)
        if "target_size" not in kwargs:
            kwargs.setdefault("limit", 100)
        return refresh_dataset(workspace, dataset, specs, booru_url=server.url, **kwargs)

    return run
