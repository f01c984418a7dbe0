"""Compile settings on the UNet's 64x64-latent blocks: time, FLOP rate and where the time goes.

Why: at batch 32 the first down block and the last up block (the two at 64x64 latents, with
self-attention over 4,096 tokens at SD1.5's head size 40) take over half of a compiled training
step. Compiling the whole UNet takes 2-3 minutes per setting; one block takes ~30 s, so
settings that change the generated kernels (inductor's matrix-product autotuning, coordinate
descent tuning) can be compared side by side in one call. Each block runs forward + backward as
in training: frozen bf16 weights under autocast, LoRA (rank 16, fused q/k/v as the trainer does
on CUDA), gradients into the LoRA weights and the block's inputs.

    python bench/blocks.py --batch 32 [--settings eager,default,autotune,coord] [--profile]
    python bench/blocks.py --smoke          # tiny UNet on CPU (the test)

Prints one row per setting and block: first call (compile) seconds, ms per forward+backward,
GFLOP (torch's flop counter, attention backward's recomputation included), TFLOP/s, the share
of the card's bf16 matrix rate, and whether the compiled output matches eager. ``--profile``
adds the GPU time per kernel category and the top kernels. Writes ``$OUT/bench_blocks.json``
when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import PEAK_TFLOPS, SD15_UNET, SMOKE_UNET  # noqa: E402  (bench/train.py)

#: inductor options per setting, on top of what the trainer passes on CUDA
#: (lora/train/speed/compile.py's COMPILED_CHANNELS_LAST_OPTIONS)
SETTINGS: dict[str, dict[str, bool] | None] = {
    "eager": None,
    "default": {},
    "autotune": {"max_autotune_gemm": True},
    "coord": {"coordinate_descent_tuning": True},
    "autotune_coord": {"max_autotune_gemm": True, "coordinate_descent_tuning": True},
}


def build_blocks(smoke: bool, batch: int, dev: str) -> tuple[dict[str, tuple[Callable, tuple]], list, torch.dtype]:
    """The UNet's first down block and last up block with LoRA, and inputs for each.

    Returns ``({name: (fn, inputs)}, trainable params, compute dtype)``."""
    from diffusers import UNet2DConditionModel

    from lora.config import resolve_config
    from lora.train.speed.fused_qkv import install_fused_qkv
    from lora.train.setup.lora import setup_lora_unet

    unet_cfg = SMOKE_UNET if smoke else SD15_UNET
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.requires_grad_(False)
    cfg = resolve_config("phase2a", {"batch_size": batch, "lora_rank": 16, "lora_alpha": 64,
                                     "resolution": unet_cfg["sample_size"] * 8, "mixed_precision": "bf16"})
    params = list(setup_lora_unet(cfg, unet, torch.device(dev), dtype).values())
    install_fused_qkv(unet)
    side = unet_cfg["sample_size"]
    c0, c1 = unet_cfg["block_out_channels"][:2]
    skips = unet_cfg.get("layers_per_block", 2) + 1
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g).requires_grad_(grad)

    temb = rand(batch, c0 * 4, grad=False)
    text = rand(batch, 77, unet_cfg["cross_attention_dim"], grad=False)
    down, up = unet.down_blocks[0], unet.up_blocks[-1]

    def down_first(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, skip = down(hidden_states=x, temb=temb, encoder_hidden_states=text)
        return (hidden, *skip)

    def up_last(x: torch.Tensor, *skip: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (up(hidden_states=x, res_hidden_states_tuple=skip, temb=temb, encoder_hidden_states=text),)

    blocks = {"down_blocks.0": (down_first, (rand(batch, c0, side, side),)),
              "up_blocks.-1": (up_last, (rand(batch, c1, side, side),
                                         *(rand(batch, c0, side, side) for _ in range(skips))))}
    return blocks, params, dtype


def compiled(fn: Callable, setting: str, dev: str, backend: str) -> Callable:
    options = SETTINGS[setting]
    if options is None:
        return fn
    if backend != "inductor":
        return torch.compile(fn, dynamic=False, backend=backend)
    if dev == "cuda":
        from lora.train.speed.compile import COMPILED_CHANNELS_LAST_OPTIONS

        options = {**COMPILED_CHANNELS_LAST_OPTIONS, **options}
    return torch.compile(fn, dynamic=False, backend=backend, options=options or None)


def time_ms(run: Callable[[], Any], reps: int, dev: str) -> float:
    """Mean wall time of ``reps`` back-to-back runs after one warm-up run."""
    run()
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    if dev == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def kernel_split(run: Callable[[], Any], iters: int = 3, top: int = 12) -> dict[str, Any]:
    """GPU ms per iteration by kernel category (bench/profile_step.py's) and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from profile_step import summarize

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e3 / iters
    split, ranked = summarize(kernels, top)
    return {"by_category_ms": {k: round(v, 3) for k, v in split.items()},
            "top_kernels_ms": [(name[:120], round(ms, 3)) for name, ms in ranked]}


def run_block(name: str, fn: Callable, inputs: tuple, params: list, setting: str, dev: str, dtype: torch.dtype,
              backend: str, reps: int, reference: list[torch.Tensor] | None, profile: bool) -> dict[str, Any]:
    """One block under one setting: first call, timing, outputs against eager, FLOPs (eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = compiled(fn, setting, dev, backend)
    outputs: list[torch.Tensor] = []

    def run() -> None:
        for t in (*params, *inputs):
            t.grad = None
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            outs = step(*inputs)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        outputs[:] = [o.detach() for o in outs]

    row: dict[str, Any] = {"setting": setting, "block": name}
    t0 = time.perf_counter()
    run()
    if dev == "cuda":
        torch.cuda.synchronize()
    row["first_s"] = round(time.perf_counter() - t0, 2)
    if reference is not None:
        err = max(float((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12))
                  for o, r in zip(outputs, reference))
        row["rel_diff_vs_eager"] = err
        row["matches_eager"] = err <= (2e-2 if dtype != torch.float32 else 1e-4)
    row["ms"] = round(time_ms(run, reps, dev), 3)
    if setting == "eager":
        with FlopCounterMode(display=False) as counter:
            run()
        row["gflop"] = counter.get_total_flops() / 1e9
        row["outputs"] = [o.clone() for o in outputs]
    if profile and dev == "cuda":
        row.update(kernel_split(run))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny UNet on CPU (aot_eager backend)")
    ap.add_argument("--batch", type=int, default=None, help="default 32, smoke 2")
    ap.add_argument("--settings", default="eager,default,autotune,coord",
                    help=f"comma-separated, of: {', '.join(SETTINGS)} (eager is always run first)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per row (default 20, smoke 2)")
    ap.add_argument("--profile", action="store_true", help="GPU time by kernel category (CUDA only)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="card's bf16 rate")
    a = ap.parse_args(argv)
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    settings = ["eager"] + [s for s in settings if s != "eager"]
    dev = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    backend = "inductor" if dev == "cuda" else "aot_eager"  # CPU: no C++/Triton code generation
    reps = a.reps or (2 if a.smoke else 20)
    a.batch = a.batch or (2 if a.smoke else 32)
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer's cudnn_benchmark=auto on CUDA
    blocks, params, dtype = build_blocks(a.smoke, a.batch, dev)
    card = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    print(f"device {card} torch {torch.__version__} batch {a.batch} backend {backend}", flush=True)
    rows: list[dict[str, Any]] = []
    eager: dict[str, dict[str, Any]] = {}
    for setting in settings:
        torch._dynamo.reset()
        for name, (fn, inputs) in blocks.items():
            ref = eager[name]["outputs"] if name in eager else None
            row = run_block(name, fn, inputs, params, setting, dev, dtype, backend, reps, ref, a.profile)
            if setting == "eager":
                eager[name] = row
            row["gflop"] = eager[name]["gflop"]
            row["tflops"] = row["gflop"] / row["ms"]
            row["mfu"] = row["tflops"] / a.peak_tflops
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "outputs"}), flush=True)
    for row in rows:
        row.pop("outputs", None)
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_blocks.json").write_text(json.dumps({"device": card, "batch": a.batch, "rows": rows},
                                                             indent=1))
    print(f"card: {card}, batch {a.batch}")
    print(f"{'setting':15s} {'block':13s} {'first s':>8s} {'ms':>9s} {'GFLOP':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'vs eager':>9s}")
    for r in rows:
        same = "-" if "matches_eager" not in r else ("ok" if r["matches_eager"] else "MISMATCH")
        print(f"{r['setting']:15s} {r['block']:13s} {r['first_s']:8.1f} {r['ms']:9.3f} {r['gflop']:8.1f} "
              f"{r['tflops']:8.1f} {r['mfu']:6.1%} {same:>9s}")
        if "by_category_ms" in r:
            print("    " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["by_category_ms"].items()))
    return 1 if any(r.get("matches_eager") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
