"""Benchmark: the CPU side of a set of samples drawn while training (files and overview grid).

Why: on an H100 each set of a 20-epoch run took longer than the last (2.4 s to 4.25 s,
bench/README.md "eleventh session") while the GPU work per set stays the same: the overview
grid shrank every earlier set's images again each time, and each set's PNGs were written at
zlib's default level. This writes ``--sets`` sets of ``--images`` images (512 px, smooth
content like a sample's) into a temporary run folder the way the trainer does and prints, per
set, the time to write its PNGs and to rebuild the overview with the copies kept
(``Thumbnails``, what the trainer does) and without (every image shrunk anew, as before), and
one PNG's encode time at zlib levels 6 (before) and 1 (now).

    python bench/sample_files.py [--sets 6] [--images 25]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def smooth_images(n: int, side: int) -> list:
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8))
            .resize((side, side), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2)) for _ in range(n)]


def write_set(paths, settings, step: int, images: list) -> None:
    """A set's folder, written by the trainer's own code (``Sampler._write_set`` reads only
    the settings from its sampler)."""
    from types import SimpleNamespace

    from lora.train.samples import Sampler

    Sampler._write_set(SimpleNamespace(settings=settings), paths.training_sample_set(step), step, 0, images)


def png_ms(image, level: int, repeat: int = 5) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        image.save(io.BytesIO(), format="PNG", compress_level=level)
    return (time.perf_counter() - t) / repeat * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--images", type=int, default=25, help="images per set (prompts x seeds)")
    ap.add_argument("--side", type=int, default=512)
    a = ap.parse_args(argv)
    from lora.runpaths import RunPaths
    from lora.train.samples import Thumbnails, TrainingSampleSettings, write_overview

    seeds = max(1, int(a.images ** 0.5))
    prompts = max(1, a.images // seeds)
    settings = TrainingSampleSettings(prompts=tuple(f"prompt {i}" for i in range(prompts)), negative_prompt="",
                                      seeds=tuple(range(seeds)), steps=20, guidance=7.0, resolution=a.side)
    images = smooth_images(len(settings.rows), a.side)
    print(f"{len(settings.rows)} images of {a.side} px per set\n")
    print("| set | write PNGs s | overview, copies kept s | overview, all shrunk anew s |\n| --- | --- | --- | --- |")
    totals = [0.0, 0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = RunPaths(Path(tmp) / "run")
        thumbnails = Thumbnails()
        steps: list[int] = []
        for n in range(a.sets):
            step = n * 100
            t0 = time.perf_counter()
            write_set(paths, settings, step, images)
            t1 = time.perf_counter()
            steps.append(step)
            write_overview(paths, steps, settings, thumbnails)
            t2 = time.perf_counter()
            write_overview(paths, steps, settings)  # as before: no copies kept
            t3 = time.perf_counter()
            spent = [t1 - t0, t2 - t1, t3 - t2]
            totals = [x + y for x, y in zip(totals, spent)]
            print(f"| {n + 1} | " + " | ".join(f"{x:.2f}" for x in spent) + " |")
        print("| all | " + " | ".join(f"{x:.2f}" for x in totals) + " |")
    level6, level1 = png_ms(images[0], 6), png_ms(images[0], 1)
    print(f"\none PNG of {a.side} px: zlib level 6 {level6:.1f} ms, level 1 {level1:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
