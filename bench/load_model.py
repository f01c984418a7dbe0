"""Benchmark: loading the base model as the trainer does, widened to fp32 (before) or as stored (now).

Why: the set-up's ``load_model`` part took 9.5 s on an H100 on a fresh machine and on a warm
one alike (bench/README.md, "eleventh session"): the benchmark's model folder stores fp16, like
many SD1.5 folders, and loading it as fp32 made the CPU widen every weight on the one torch
thread a GPU run uses. This times ``load_components`` both ways in one process, alternating,
with that thread count, on a random-weight SD1.5-shaped folder (bench/train.py builds it in
fp16) or the folder given::

    python bench/load_model.py [--model DIR] [--repeat 2] [--threads 1]

``--smoke`` uses the tiny model (its files are fp32: both ways load the same).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a diffusers folder (default: build a random SD1.5 one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a GPU run uses 1)")
    ap.add_argument("--smoke", action="store_true", help="the tiny model")
    a = ap.parse_args(argv)
    import torch

    from lora.model import ensure_tiny_model, load_components, stored_dtype

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            folder = ensure_tiny_model()
        elif a.model:
            folder = Path(a.model)
        else:
            from bench.train import build_random_sd15

            folder = Path(tmp) / "sd15"
            build_random_sd15(folder, False)
        stored = {part: str(stored_dtype(folder, part)).removeprefix("torch.") for part in ("unet", "vae", "text_encoder")}
        print(f"{folder}: stored {stored}; {a.threads} torch thread(s)\n")
        ways = {"widened to fp32 (before)": torch.float32, "as stored (now)": None}
        times: dict[str, list[float]] = {name: [] for name in ways}
        load_components(str(folder), dtype=None)  # imports and first-load costs, in neither row
        for _ in range(a.repeat):
            for name, dtype in ways.items():
                t = time.perf_counter()
                comps = load_components(str(folder), dtype=dtype)
                times[name].append(time.perf_counter() - t)
                del comps
        print("| load_components | median s | each s |\n| --- | --- | --- |")
        for name, each in times.items():
            print(f"| {name} | {statistics.median(each):.2f} | {', '.join(f'{x:.2f}' for x in each)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
