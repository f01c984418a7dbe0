"""Where a training step's GPU time goes: kernel categories and the top kernels of one variant.

Runs the trainer's step (bench/train.py's ``make_step``) with CUDA graphs off (a graph replay
hides its kernels from the profiler), profiles a few steps with ``torch.profiler`` and prints
the GPU time per category (attention, matrix products, convolutions, fused Triton kernels,
other elementwise work, the optimizer) and the top kernels. ``--sdpa`` also times each
scaled-dot-product attention kernel alone, forward + backward, at the SD1.5 shapes.

    python bench/profile_step.py --variant animelora_fast_nographs_nocompile --batch 4 [--sdpa] [--by-shape]

Writes ``$OUT/profile_<variant>.json`` when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import make_step  # noqa: E402  (bench/train.py)

#: (category, substrings of the kernel name), first match wins
CATEGORIES = [
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("convolution", ("conv", "implicit", "wgrad", "dgrad", "fprop")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "cublas", "splitk")),
    ("triton (fused)", ("triton",)),
    ("norm", ("norm", "welford")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other elementwise/copy"


def summarize(kernels: dict[str, float], top: int = 25) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Kernel times (any unit) summed per category, largest first, and the ``top`` largest kernels."""
    cats: dict[str, float] = defaultdict(float)
    for name, t in kernels.items():
        cats[category(name)] += t
    return (dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            sorted(kernels.items(), key=lambda kv: -kv[1])[:top])


#: aten ops whose device time is grouped by input shape with --by-shape
SHAPED_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution", "aten::convolution_backward",
              "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_cudnn_attention_backward",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward")


def profile_variant(variant: str, batch: int, steps: int, by_shape: bool = False, rank: int = 16) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    step, runner, opts, _ = make_step(variant, smoke=False, batch=batch, rank=rank, alpha=64, dev="cuda")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if by_shape else [])
    with profile(activities=activities, record_shapes=by_shape) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    from torch.autograd import DeviceType

    for evt in prof.key_averages():
        if by_shape and getattr(evt, "device_type", None) == DeviceType.CPU:
            continue  # with CPU activity on, operators carry their kernels' time too: count kernels once
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if dev_us and evt.key and not evt.key.startswith("ProfilerStep"):
            kernels[evt.key] += dev_us / steps
    # key_averages mixes operators and kernels; keep kernels (no "aten::" / "cuda" API entries)
    kernels = {k: v for k, v in kernels.items() if not k.startswith(("aten::", "cuda", "Memcpy", "Memset",
                                                                      "autograd", "torch", "Torch"))}
    cats, top = summarize(kernels)
    total = sum(cats.values())
    result = dict(variant=variant, batch=batch, gpu_ms_per_step=total / 1e3,
                  categories={k: round(v / 1e3, 3) for k, v in cats.items()},
                  top=[(k[:120], round(v / 1e3, 3)) for k, v in top], fast=runner.fast.__dict__)
    if by_shape:
        result.update(shaped_ops(prof, steps, rank))
    return result


def _ancestry(evt, depth: int = 6) -> str:
    """The operators around ``evt``, innermost first (``a < b < c``): where a kernel came from."""
    names: list[str] = []
    parent = evt.cpu_parent
    while parent is not None and len(names) < depth:
        if not names or names[-1] != parent.name:
            names.append(parent.name[:60])
        parent = parent.cpu_parent
    return " < ".join(names) or "-"


def shaped_ops(prof, steps: int, rank: int) -> dict[str, Any]:
    """Device ms per step of matrix products, convolutions and attention by input shape, and
    the share of matrix products with a LoRA-rank dimension (the skinny LoRA products)."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key in SHAPED_OPS:
            dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
            rows[(evt.key, str(evt.input_shapes))][0] += dev_us / steps / 1e3
            rows[(evt.key, str(evt.input_shapes))][1] += evt.count / steps
    mm = {k: v for k, v in rows.items() if k[0] in ("aten::mm", "aten::addmm")}
    lora = {k: v for k, v in mm.items() if f", {rank}]" in k[1] or f"[{rank}," in k[1]}
    ordered = sorted(rows.items(), key=lambda kv: -kv[1][0])
    # which operator launched the copy kernels (the launching op and the op around it)
    copies: dict[tuple[str, str, str], float] = defaultdict(float)
    for evt in prof.events():
        for kernel in getattr(evt, "kernels", None) or []:
            if "copy" in kernel.name.lower():
                parent = _ancestry(evt)
                copies[(evt.name, parent, str(getattr(evt, "input_shapes", ""))[:120])] += kernel.duration / steps / 1e3
    top_copies = sorted(copies.items(), key=lambda kv: -kv[1])[:15]
    return dict(copy_kernels_by_op=[(op, parent, shapes, round(ms, 3)) for (op, parent, shapes), ms in top_copies],
                matmul_ms=round(sum(v[0] for v in mm.values()), 3),
                lora_matmul_ms=round(sum(v[0] for v in lora.values()), 3),
                lora_matmul_calls=round(sum(v[1] for v in lora.values())),
                by_shape=[(op, shapes[:160], round(ms, 3), round(calls)) for (op, shapes), (ms, calls) in ordered[:60]])


def sdpa_table(batch: int) -> list[dict[str, Any]]:
    """SDPA forward+backward per kernel at the UNet's attention shapes (bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from triton.testing import do_bench

    shapes = [  # (name, query tokens, key tokens, heads, head dim)
        ("self 64x64", 4096, 4096, 8, 40), ("cross 64x64", 4096, 77, 8, 40),
        ("self 32x32", 1024, 1024, 8, 80), ("cross 32x32", 1024, 77, 8, 80),
        ("self 16x16", 256, 256, 8, 160), ("cross 16x16", 256, 77, 8, 160),
    ]
    rows = []
    for label, nq, nk, heads, d in shapes:
        # (batch, tokens, heads, dim) seen as (batch, heads, tokens, dim): the strides diffusers passes
        q = torch.randn(batch, nq, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        k = torch.randn(batch, nk, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        v = torch.randn(batch, nk, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        row: dict[str, Any] = {"shape": label, "batch": batch}
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            def run() -> None:
                with sdpa_kernel([backend]):
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                out.sum().backward()
            try:
                row[name + "_ms"] = round(do_bench(run, warmup=10, rep=50), 3)
            except Exception as exc:  # noqa: BLE001 - a kernel that refuses the shape
                row[name + "_ms"] = f"n/a ({type(exc).__name__})"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=None,
                    help="bench/train.py variant name (repeatable); CUDA graphs are forced off")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sdpa", action="store_true", help="also time each SDPA kernel alone")
    ap.add_argument("--by-shape", action="store_true",
                    help="also group matrix products, convolutions and attention by input shape (LoRA's share)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device", file=sys.stderr)
        return 2
    print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    out = os.environ.get("OUT")
    results: dict[str, Any] = {}
    if a.sdpa:
        results["sdpa"] = sdpa_table(a.batch)
        for row in results["sdpa"]:
            print("sdpa", json.dumps(row), flush=True)
    for variant in a.variant or ["animelora_fast_nographs_nocompile"]:
        if "nographs" not in variant:
            variant += "_nographs"
        res = profile_variant(variant, a.batch, a.steps, by_shape=a.by_shape)
        results[variant] = res
        print(f"\n{variant} batch {a.batch}: {res['gpu_ms_per_step']:.2f} GPU ms per step (kernels)")
        for cat, ms in res["categories"].items():
            print(f"  {cat:24s} {ms:8.2f} ms  {ms / res['gpu_ms_per_step']:6.1%}")
        for name, ms in res["top"][:15]:
            print(f"    {ms:7.3f} ms  {name}")
        if a.by_shape:
            print(f"  matrix products {res['matmul_ms']:.2f} ms, of which LoRA rank-16 products "
                  f"{res['lora_matmul_ms']:.2f} ms ({res['lora_matmul_calls']} a step)")
            for op, shapes, ms, calls in res["by_shape"][:30]:
                print(f"    {ms:7.3f} ms x{calls:<4d} {op} {shapes}")
            print("  copy kernels by launching operator (op, the op around it, shapes):")
            for op, parent, shapes, ms in res["copy_kernels_by_op"]:
                print(f"    {ms:7.3f} ms  {op} < {parent} {shapes}")
        torch.cuda.empty_cache()
    if out:
        Path(out, "profile.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
