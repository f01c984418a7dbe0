"""Benchmark of the data-processing steps: phash, prepare_image, near-duplicate grouping.

Usage: ``python bench/data.py [--quick]``. Prints machine info and a markdown table.

- phash images/s on generated 768x512 pictures (decoded images in memory);
- prepare_image images/s from encoded PNG (decode, flatten, hash, re-encode PNG, atomic write) and
  from RGB JPEG (decode, hash, exact byte copy);
- near-duplicate grouping at radius 4 for 10k / 100k / 1M / 10M random hashes (``--hashes``)
  with ~1% planted near-duplicates at distance 1..4: multi-index grouping (with its time per
  million hashes, flat when the cost is linear) vs naive pairwise (naive only where it is
  expected to finish in under 60 s);
- the incremental HammingIndex: build time and query time against 100k stored hashes.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.data.dedup import HammingIndex, group_near_duplicates, naive_group  # noqa: E402
from lora.data.images import compute_phash, prepare_image  # noqa: E402

NAIVE_LIMIT_S = 60.0


def make_picture(seed: int, size: tuple[int, int] = (768, 512)) -> Image.Image:
    """A structured picture (gradient + shapes): realistic work for resize/DCT/PNG, unlike noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c0, c1, c2 = rng.integers(0, 256, size=(3, 3))
    arr = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
    arr = arr + rng.normal(0, 6, size=(h, w, 1))  # a little grain, like scanned/painted texture
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img


def planted_hashes(n: int, seed: int = 0, frac: float = 0.01) -> np.ndarray:
    """n random uint64 hashes, ``frac`` of them overwritten by copies of others at distance 1..4."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    k = max(1, int(n * frac))
    src = rng.integers(0, n, size=k)
    dst = rng.integers(0, n, size=k)
    dist = rng.integers(1, 5, size=k)
    positions = np.argsort(rng.random((k, 64)), axis=1)  # distinct bit positions per row
    masks = np.zeros(k, dtype=np.uint64)
    for j in range(4):
        use = dist > j
        masks[use] |= np.uint64(1) << positions[use, j].astype(np.uint64)
    h[dst] = h[src] ^ masks
    return h


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, no 1M or 10M grouping")
    parser.add_argument("--hashes", default=None, metavar="N,N,...",
                        help="hash counts to group (default 10k,100k,1M,10M; --quick: 10k,100k)")
    args = parser.parse_args(argv)

    n_images = 50 if args.quick else 200
    if args.hashes:
        sizes = [int(float(v)) for v in args.hashes.split(",")]
    else:
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000, 10_000_000]

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    print("## Data benchmark (bench/data.py)\n")
    print(f"- machine: {platform.platform()}, {platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"- cpus: {cpus} (usable: {usable}); python {platform.python_version()}, "
          f"numpy {np.__version__}, pillow {Image.__version__}")
    print(f"- mode: {'quick' if args.quick else 'full'}; load average at start: "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}\n")

    rows: list[tuple[str, str, str]] = []

    pictures = [make_picture(i) for i in range(n_images)]
    dt, _ = timed(lambda: [compute_phash(p) for p in pictures])
    rows.append((f"phash, {n_images} images 768x512 (decoded)", f"{n_images / dt:,.0f} images/s", f"{dt:.2f} s"))

    pngs = [encode(p, "PNG") for p in pictures]
    jpgs = [encode(p, "JPEG", quality=90) for p in pictures]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        dt, _ = timed(lambda: [prepare_image(b, out / f"p{i}") for i, b in enumerate(pngs)])
        rows.append((f"prepare_image, PNG source -> PNG ({n_images})", f"{n_images / dt:,.0f} images/s", f"{dt:.2f} s"))
        dt, _ = timed(lambda: [prepare_image(b, out / f"j{i}") for i, b in enumerate(jpgs)])
        rows.append((f"prepare_image, RGB JPEG source -> kept bytes ({n_images})", f"{n_images / dt:,.0f} images/s", f"{dt:.2f} s"))

    naive_10k = None
    for n in sizes:
        hashes = planted_hashes(n, seed=n)
        dt, labels = timed(group_near_duplicates, hashes, 4)
        groups = int((labels != np.arange(n)).sum())
        rows.append((f"group near-duplicates, {n:,} hashes, r=4, multi-index", f"{dt:.3f} s",
                     f"{groups:,} grouped, {dt / n * 1e6:.2f} s per million"))
        estimate = None if naive_10k is None else naive_10k * (n / 10_000) ** 2
        if n == 10_000 or (estimate is not None and estimate < NAIVE_LIMIT_S):
            dt_naive, naive_labels = timed(naive_group, hashes, 4)
            if n == 10_000:
                naive_10k = dt_naive
            same = "same labels" if np.array_equal(naive_labels, labels) else "LABELS DIFFER"
            rows.append((f"group near-duplicates, {n:,} hashes, r=4, naive pairwise", f"{dt_naive:.3f} s", same))
        else:
            est = f"~{estimate:,.0f} s estimated" if estimate else "not run"
            rows.append((f"group near-duplicates, {n:,} hashes, r=4, naive pairwise", "skipped (O(n²))", est))

    stored = planted_hashes(100_000, seed=1)
    index: HammingIndex[int] = HammingIndex(radius=4)
    dt_build, _ = timed(index.add_many, stored.tolist(), range(stored.size))
    probes = (stored[:5000] ^ np.uint64(0b10001)).tolist()
    dt_query, _ = timed(lambda: [index.nearest(p) for p in probes])
    rows.append(("HammingIndex build, 100,000 hashes, r=4", f"{dt_build:.2f} s", f"{stored.size / dt_build:,.0f} adds/s"))
    rows.append(("HammingIndex nearest() against 100,000", f"{dt_query / len(probes) * 1e6:.0f} µs/query",
                 f"{len(probes)} queries"))

    print("| step | result | notes |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
