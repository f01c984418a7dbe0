"""Benchmark: animelora's training step vs. the diffusers script's step, same process.

The animelora variants run the trainer's own ``StepRunner`` (lora/train/step.py) on the full
SD1.5 UNet architecture with random weights (config inline, nothing downloaded) at the
phase2a settings: batch 4, LoRA rank 16 / alpha 64 on to_q/to_k/to_v/to_out.0, 512 px
(64x64 latents), bf16 base weights with fp32 LoRA, latents and text embeddings cached so a
step runs only the UNet; once without and once with gradient checkpointing. Beside them,
``peer_baselines.py``'s ``diffusers_script_fp16`` variant (diffusers' train_text_to_image_lora.py
step: VAE and text encoder every step, fp16 autocast) runs in the same call.

    python bench/train.py                    # GPU: full size, prints images/s and peak GiB
    python bench/train.py --smoke            # CPU-sized shapes, two timed steps (a test)
    python bench/train.py --peer PATH        # where peer_baselines.py is (default: shared/bench/
                                             # in the repo, else ../shared/bench/)

Writes ``$OUT/bench_train.json`` when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# SD1.5 unet/config.json values (the architecture; weights are random).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# The same block layout, CPU-sized, for --smoke (matches peer_baselines' --tiny UNet).
SMOKE_UNET = dict(
    sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8,
)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="epsilon")


def find_peer(path: str | None) -> Path | None:
    candidates = [Path(path)] if path else [REPO / "shared" / "bench" / "peer_baselines.py",
                                            REPO.parent / "shared" / "bench" / "peer_baselines.py"]
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_peer(path: Path):
    spec = importlib.util.spec_from_file_location("peer_baselines", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def timed(step: Callable[[], Any], n: int, warm: int, dev: str) -> tuple[float, float, float]:
    """Median seconds per step, peak GiB after warm-up (as peer_baselines measures), last loss."""
    for _ in range(warm):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(n):
        t = time.perf_counter()
        loss = step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    return statistics.median(times), peak, float(loss)


def animelora_variant(name: str, *, smoke: bool, batch: int, rank: int, alpha: int, steps: int,
                      warm: int, dev: str, checkpointing: bool) -> dict[str, Any]:
    """The trainer's step (StepRunner) on a random-weight SD1.5-architecture UNet."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lora.config import resolve_config
    from lora.train.cache import CachedItems
    from lora.train.step import StepRunner, make_accelerator, make_optimizer, make_scheduler, setup_lora_unet

    unet_cfg = SMOKE_UNET if smoke else SD15_UNET
    res = 64 if smoke else 512
    text_dim = unet_cfg["cross_attention_dim"]
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.requires_grad_(False)
    cfg = resolve_config("phase2a", {
        "batch_size": batch, "lora_rank": rank, "lora_alpha": alpha, "resolution": res,
        "mixed_precision": "bf16", "gradient_checkpointing": checkpointing,
    })
    accelerator = make_accelerator("bf16", cpu=dev == "cpu")
    trainable = setup_lora_unet(cfg, unet, accelerator.device, torch.bfloat16)
    params = list(trainable.values())
    optimizer = make_optimizer(cfg, [{"params": params, "lr": cfg.learning_rate}])
    unet, optimizer = accelerator.prepare(unet, optimizer)
    lr_scheduler = make_scheduler(cfg, optimizer, 10**6)
    noise_scheduler = DDPMScheduler(**SD15_SCHEDULER)
    # cached latents (res/8) and CLIP hidden states, on the host as in the trainer
    n_items = batch * 4
    g = torch.Generator().manual_seed(0)
    cache = CachedItems(latents=[torch.randn(4, res // 8, res // 8, generator=g) for _ in range(n_items)],
                        latents_flip=None,
                        text=[torch.randn(77, text_dim, generator=g) for _ in range(n_items)])

    def text_for(indices, _rng):
        return torch.stack([cache.text[i] for i in indices]).to(accelerator.device, non_blocking=True)

    runner = StepRunner(cfg, accelerator, unet, optimizer, lr_scheduler, noise_scheduler, params, cache, text_for)
    batches = [[list(range(k * batch, (k + 1) * batch))] for k in range(4)]
    counter = [0]

    def step() -> float:
        counter[0] += 1
        loss, _ = runner.run(counter[0], batches[counter[0] % 4])
        return loss

    sec, peak, loss = timed(step, steps, warm, dev)
    del runner, unet, optimizer
    if dev == "cuda":
        torch.cuda.empty_cache()
    return dict(variant=name, batch=batch, rank=rank, s_per_step=sec, img_per_s=batch / sec,
                peak_gib=peak, loss=loss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 timed steps (CPU test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20, smoke 2)")
    ap.add_argument("--warm", type=int, default=None, help="warm-up steps (default 5, smoke 1)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--peer", default=None, help="path to peer_baselines.py")
    ap.add_argument("--no-peer", action="store_true", help="skip the diffusers-script baseline")
    ap.add_argument("--variants", default="animelora_bf16,animelora_bf16_gc,diffusers_script_fp16")
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (2 if a.smoke else 20)
    warm = a.warm if a.warm is not None else (1 if a.smoke else 5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print("device", torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch", torch.__version__,
          "smoke" if a.smoke else "full SD1.5", flush=True)

    peer = None
    if not a.no_peer:
        path = find_peer(a.peer)
        if path is None:
            print("error: peer_baselines.py not found (shared/bench/ or ../shared/bench/); pass --peer PATH "
                  "or --no-peer", file=sys.stderr)
            return 2
        peer = load_peer(path)

    rows: list[dict[str, Any]] = []
    for name in [v.strip() for v in a.variants.split(",") if v.strip()]:
        try:
            if name.startswith("animelora"):
                row = animelora_variant(name, smoke=a.smoke, batch=a.batch, rank=16, alpha=64, steps=steps,
                                        warm=warm, dev=dev, checkpointing=name.endswith("_gc"))
            elif peer is not None:
                row = peer.run_variant(name, a.smoke, a.batch, 16, 64, steps, warm, dev)
            else:
                continue
        except Exception as exc:  # noqa: BLE001 - OOM or an unsupported op: report it in the table
            row = dict(variant=name, batch=a.batch, error=f"{type(exc).__name__}: {exc}"[:200])
            if dev == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_train.json").write_text(json.dumps({"device": dev, "smoke": a.smoke, "rows": rows}, indent=1))
    print(f"{'variant':26s} {'batch':>5s} {'images/s':>9s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:26s} {r['batch']:>5d} ERROR {r['error'][:70]}")
        else:
            print(f"{r['variant']:26s} {r['batch']:>5d} {r['img_per_s']:9.2f} {r['peak_gib']:9.2f}")
    return 1 if any("error" in r and r["variant"].startswith("animelora") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
