"""Benchmark: what the first call of each kernel costs in a new process, and what survives it.

Why: a fresh GPU machine took 31.7-40.6 s to warm up the graphs of 5 bucket shapes, a warm
one 13.8 s (bench/README.md, ninth and tenth sessions), so something that outlives a process
makes the second run faster. Candidates: cuDNN's attention kernels, which it generates and
compiles at run time for each new problem (``cudnn_generated_fort_native_sdpa_...`` in the
step profile), and the CUDA driver's cache of compiled code (``~/.nv/ComputeCache``, or
``CUDA_CACHE_PATH``). This times, in the process it runs in, the first and the second call
(forward + backward) of SD1.5's attention at the danbooru buckets' sizes with each SDPA
kernel, and a few of its convolutions; run it several times in a row, with the cache kept,
elsewhere or off, and compare the first calls::

    python bench/first_calls.py                      # a new process: first calls
    python bench/first_calls.py                      # again: what the caches kept
    CUDA_CACHE_DISABLE=1 python bench/first_calls.py # the driver's cache off

Prints one table row per (kind, shape) and a JSON line; ``--smoke`` runs tiny shapes on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: SD1.5's attention at the danbooru buckets' latents (512x768 -> 64x96, ...): (query tokens,
#: heads, head size) per level, self-attention; cross-attention uses 77 keys.
LATENTS = [(64, 96), (72, 88), (56, 96), (96, 64), (64, 64)]
LEVELS = [(1, 8, 40), (2, 8, 80), (4, 8, 160)]  # (downscale, heads, head size)


def _timed(fn) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def attention_rows(backend: str, batch: int, latents, device, dtype) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    rows = []
    for h, w in latents:
        for down, heads, dim in LEVELS:
            tokens = (h // down) * (w // down)
            for keys in (tokens, 77):
                q = torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True)
                k = torch.randn(batch, heads, keys, dim, device=device, dtype=dtype, requires_grad=True)
                v = torch.randn(batch, heads, keys, dim, device=device, dtype=dtype, requires_grad=True)

                def call():
                    with sdpa_kernel([kernel]):
                        F.scaled_dot_product_attention(q, k, v).sum().backward()

                try:
                    first = _timed(call)
                    second = _timed(call)
                except RuntimeError as exc:  # a kernel that does not take this shape
                    rows.append(dict(kind=f"sdpa-{backend}", shape=f"{h}x{w}/{down} q{tokens} k{keys} d{dim}",
                                     error=str(exc).splitlines()[0][:80]))
                    continue
                rows.append(dict(kind=f"sdpa-{backend}", shape=f"{h}x{w}/{down} q{tokens} k{keys} d{dim}",
                                 first_s=round(first, 4), second_s=round(second, 4)))
    return rows


def conv_rows(batch: int, latents, device, dtype) -> list[dict]:
    import torch

    rows = []
    for h, w in latents:
        for down, channels in ((1, 320), (2, 640), (4, 1280)):
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
            x = torch.randn(batch, channels, h // down, w // down, device=device, dtype=dtype,
                            requires_grad=True).to(memory_format=torch.channels_last)

            def call():
                conv(x).sum().backward()

            rows.append(dict(kind="conv3x3", shape=f"{h}x{w}/{down} c{channels}", first_s=round(_timed(call), 4),
                             second_s=round(_timed(call), 4)))
    return rows


def cache_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cudnn,flash,efficient")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the math kernel")
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not a.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    latents = [(8, 12), (8, 8)] if a.smoke else LATENTS
    backends = ["math"] if a.smoke else [b for b in a.backends.split(",") if b]
    driver_cache = Path(os.environ.get("CUDA_CACHE_PATH") or Path.home() / ".nv" / "ComputeCache")
    before = cache_size(driver_cache)
    started = time.perf_counter()
    if cuda:
        torch.zeros(1, device=device)  # the context, apart from the first kernel
    context_s = time.perf_counter() - started
    rows = []
    for backend in backends:
        rows += attention_rows(backend, a.batch, latents, device, dtype)
    rows += conv_rows(a.batch, latents, device, dtype)
    after = cache_size(driver_cache)
    print("| kind | shape | first call s | second call s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kind']} | {r['shape']} | {r.get('first_s', r.get('error'))} | {r.get('second_s', '-')} |")
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["kind"]] = round(totals.get(r["kind"], 0.0) + r.get("first_s", 0.0) - r.get("second_s", 0.0), 3)
    summary = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   cuda_cache_disable=os.environ.get("CUDA_CACHE_DISABLE"), driver_cache=str(driver_cache),
                   driver_cache_mib_before=round(before / 2**20, 1), driver_cache_mib_after=round(after / 2**20, 1),
                   context_s=round(context_s, 2), first_minus_second_s=totals,
                   wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps(summary))
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "bench_first_calls.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({**summary, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
