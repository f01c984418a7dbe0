"""A generated data set on disk, for tests and benchmarks that train without fetching anything.

Flat-coloured noisy PNGs with kohya-style captions and a ``versions/v0001.json`` written by the
project's own :func:`lora.data.versions.write_version`, so the folder has the layout a fetched
data set has (docs/architecture.md) and follows it if that format changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from lora.data.manifest import DatasetPaths
from lora.data.versions import write_version


def write_synthetic_dataset(root: Path, n: int, sizes: Sequence[tuple[int, int]], *, first_id: int = 100,
                            seed: int = 0, caption: Callable[[int], str] | None = None,
                            compress_level: int = 6) -> Path:
    """``n`` images (``sizes[i % len(sizes)]`` = (width, height)), ids from ``first_id``, and
    version v0001 listing them all; returns ``root``. Seeded: the same call gives the same pixels."""
    paths = DatasetPaths(Path(root))
    paths.images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    caption = caption or (lambda i: f"1girl, solo, tag{i % 4}, color{i % 3}, scene{i % 2}")
    ids, files = [], []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        post = str(first_id + i)
        Image.fromarray(arr).save(paths.images / f"{post}.png", compress_level=compress_level)
        (paths.images / f"{post}.txt").write_text(caption(i))
        ids.append(post)
        files.append(paths.image_entry(f"{post}.png"))
    write_version(paths, "v0001", ids, files, {"main": "1girl"})
    return paths.root
