"""Benchmark: animelora's training step vs. the diffusers script's step, same process.

The animelora variants run the trainer's own ``StepRunner`` (lora/train/step/runner.py) on the full
SD1.5 UNet architecture with random weights (config inline, nothing downloaded) at the
phase2a settings: batch 4, LoRA rank 16 / alpha 64 on to_q/to_k/to_v/to_out.0, 512 px
(64x64 latents), bf16 base weights with fp32 LoRA, latents and text embeddings cached so a
step runs only the UNet; once without and once with gradient checkpointing. Beside them,
``peer_baselines.py``'s ``diffusers_script_fp16`` variant (diffusers' train_text_to_image_lora.py
step: VAE and text encoder every step, fp16 autocast) runs in the same call.

    python bench/train.py                    # GPU: full size, prints images/s and peak GiB
    python bench/train.py --smoke            # CPU-sized shapes, two timed steps (a test)
    python bench/train.py --peer PATH        # the peer step's file (not part of this repository;
                                             # default: $ANIMELORA_PEER_BASELINES); --no-peer: ours only

Writes ``$OUT/bench_train.json`` when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

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
    """The peer step's file: ``--peer``, else ``$ANIMELORA_PEER_BASELINES`` (it is not part of
    this repository)."""
    env = os.environ.get("ANIMELORA_PEER_BASELINES")
    candidates = [Path(path)] if path else ([Path(env)] if env else [])
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


def timed_run(step: "TrainerStep", n: int, warm: int, dev: str) -> tuple[float, float, float]:
    """Seconds per step over ``n`` steps run as the trainer's loop runs them (no extra wait
    between steps: with ``overlap_steps`` a step's loss is read while the next one runs), peak
    GiB after warm-up, last loss."""
    for _ in range(warm):
        step()
    step.drain()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    loss = float("nan")
    for _ in range(n):
        loss = step()
    last = step.drain()  # with overlap_steps: the last step's loss, read now
    loss = last if last == last else loss
    if dev == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / n
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    return sec, peak, float(loss)


def peak_reserved() -> float:
    """Memory the process holds from the card (CUDA-graph pools included), in GiB.

    ``max_memory_allocated`` does not count the blocks a captured graph reuses during replay,
    so for graphed variants this is the figure that says what card the step fits on."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")


#: UNet forward+backward with a frozen base, LoRA r16, 512 px (counted with torch's FlopCounterMode).
GFLOP_PER_IMAGE = 1788.0
#: The card's measured bf16 matrix rate (H200: about 790 TFLOP/s); override with --peak-tflops.
PEAK_TFLOPS = 790.0


#: TrainConfig's auto/on/off fast-path switches: a variant starts at "auto", ``_plain`` turns all
#: off, and each one is passed to the trainer's config as set
SWITCHES = ("compile", "cuda_graphs", "channels_last", "cudnn_benchmark", "fused_qkv", "overlap_steps",
            "compiled_channels_last", "half_norms")


def parse_variant(name: str, default_batch: int) -> dict[str, Any]:
    """``animelora[_plain|_fast][_gc][_bNN][_nocompile][_nographs][_nocl][_<kernel>attn][_nocudnnbench][_nostage]
    [_nofuse][_nooverlap][_nocclayout|_cclayout][_halfnorms|_nohalfnorms][_allthreads]``
    -> settings (``<kernel>``: default, cudnn, flash, efficient, math).

    ``plain``: every fast-path switch off (the trainer's plain step). ``fast`` or neither: the
    trainer's defaults (``auto``: on for CUDA, off on CPU). ``bf16`` is accepted as a no-op.
    """
    parts = name.split("_")[1:]
    opts: dict[str, Any] = {"batch": default_batch, "checkpointing": False, "attention": "auto",
                            "stage": True, "host_threads": True, **dict.fromkeys(SWITCHES, "auto")}
    for part in parts:
        if part == "plain":
            opts.update(dict.fromkeys(SWITCHES, "off"), attention="default")
        elif part == "gc":
            opts["checkpointing"] = True
        elif part.startswith("b") and part[1:].isdigit():
            opts["batch"] = int(part[1:])
        elif part == "nocompile":
            opts["compile"] = "off"
        elif part == "nographs":
            opts["cuda_graphs"] = "off"
        elif part == "nocl":
            opts["channels_last"] = "off"
        elif part.endswith("attn") and part[:-4] in ("default", "cudnn", "flash", "efficient", "math"):
            opts["attention"] = part[:-4]
        elif part == "nocudnnbench":
            opts["cudnn_benchmark"] = "off"
        elif part == "nostage":
            opts["stage"] = False
        elif part == "nofuse":
            opts["fused_qkv"] = "off"
        elif part == "nooverlap":
            opts["overlap_steps"] = "off"
        elif part in ("nocclayout", "cclayout"):
            opts["compiled_channels_last"] = "off" if part == "nocclayout" else "on"
        elif part in ("halfnorms", "nohalfnorms"):
            opts["half_norms"] = "off" if part == "nohalfnorms" else "on"
        elif part == "allthreads":
            opts["host_threads"] = False
        elif part in ("fast", "bf16"):
            pass
        else:
            raise ValueError(f"unknown variant part {part!r} in {name!r}")
    return opts


class TrainerStep:
    """Each call queues the trainer's next optimizer step as its loop does: the step after is
    staged while this one runs, and with ``overlap_steps`` the loss read is that of the step
    before (:meth:`drain` reads the last one). Returns the loss read (nan if none yet)."""

    def __init__(self, runner, batches: list[list[list[int]]], stage: bool, overlap: bool,
                 first_losses: list[float]) -> None:
        self.runner, self.batches, self.stage, self.overlap = runner, batches, stage, overlap
        self.first_losses = first_losses
        self.count = 0
        self.pending = None

    def _read(self, pending) -> float:
        loss, _ = pending.values()
        if len(self.first_losses) < 3:
            self.first_losses.append(loss)
        return loss

    def __call__(self) -> float:
        self.count += 1
        n, k = self.count, len(self.batches)
        upcoming = (n + 1, self.batches[(n + 1) % k]) if self.stage else None
        queued = self.runner.queue(n, self.batches[n % k], upcoming=upcoming)
        if not self.overlap:
            return self._read(queued)
        before, self.pending = self.pending, queued
        return self._read(before) if before is not None else float("nan")

    def drain(self) -> float:
        """Read the step still in flight (overlap), so every queued step has finished."""
        before, self.pending = self.pending, None
        return self._read(before) if before is not None else float("nan")


def make_step(name: str, *, smoke: bool, batch: int, rank: int, alpha: int, dev: str,
              checkpointing: bool | None = None) -> tuple[TrainerStep, Any, dict[str, Any], list[float]]:
    """The trainer's step (StepRunner) on a random-weight SD1.5-architecture UNet.

    Returns ``(step, runner, options, first_losses)``: each ``step()`` call runs the next
    optimizer step on the same seeded inputs in every variant (the loss check below)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lora.config import resolve_config
    from lora.train.data.cache import CachedItems
    from lora.train.setup.accelerator import make_accelerator
    from lora.train.setup.lora import setup_lora_unet
    from lora.train.setup.optimizer import make_optimizer, make_scheduler
    from lora.train.step.inputs import stack_to_device
    from lora.train.step.runner import StepRunner

    opts = parse_variant(name, batch)
    batch = opts["batch"]
    if checkpointing is not None:
        opts["checkpointing"] = checkpointing
    unet_cfg = SMOKE_UNET if smoke else SD15_UNET
    res = 64 if smoke else 512
    text_dim = unet_cfg["cross_attention_dim"]
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.requires_grad_(False)
    cfg = resolve_config("phase2a", {
        "batch_size": batch, "lora_rank": rank, "lora_alpha": alpha, "resolution": res,
        "mixed_precision": "bf16", "gradient_checkpointing": opts["checkpointing"],
        "attention": opts["attention"], **{key: opts[key] for key in SWITCHES},
    })
    torch.backends.cudnn.benchmark = False  # process-wide: each variant sets it from its own options
    accelerator = make_accelerator("bf16", cpu=dev == "cpu")
    trainable = setup_lora_unet(cfg, unet, accelerator.device, torch.bfloat16)
    params = list(trainable.values())
    optimizer = make_optimizer(cfg, [{"params": params, "lr": cfg.learning_rate}])
    unet = accelerator.prepare_model(unet, evaluation_mode=True)
    optimizer = accelerator.prepare_optimizer(optimizer)
    lr_scheduler = make_scheduler(cfg, optimizer, 10**6)
    noise_scheduler = DDPMScheduler(**SD15_SCHEDULER)
    # cached latents (res/8) and CLIP hidden states, on the host as in the trainer; the same
    # seeds in every variant, so step k sees the same inputs in each (the loss check below)
    n_items = batch * 4
    g = torch.Generator().manual_seed(0)
    cache = CachedItems(latents=[torch.randn(4, res // 8, res // 8, generator=g) for _ in range(n_items)],
                        latents_flip=None,
                        text=[torch.randn(77, text_dim, generator=g) for _ in range(n_items)])

    def text_for(indices, _rng):
        return stack_to_device([cache.text[i] for i in indices], accelerator.device)

    runner = StepRunner(cfg, accelerator, unet, optimizer, lr_scheduler, noise_scheduler, params, cache, text_for)
    batches = [[list(range(k * batch, (k + 1) * batch))] for k in range(4)]
    first_losses: list[float] = []
    step = TrainerStep(runner, batches, opts["stage"], runner.fast.overlap_steps, first_losses)
    return step, runner, opts, first_losses


def animelora_variant(name: str, *, smoke: bool, batch: int, rank: int, alpha: int, steps: int,
                      warm: int, dev: str, checkpointing: bool | None = None) -> dict[str, Any]:
    """Times the trainer's step: the first step (compile + capture) apart, then the mean of the
    timed steps run back to back (:func:`timed_run`).
    CPU threads as the trainer sets them on a GPU (lora/train/run/host.py) unless ``_allthreads``."""
    from lora.train.run.host import host_threads_for

    with host_threads_for(dev == "cuda" and parse_variant(name, batch)["host_threads"]):
        return _timed_variant(name, smoke=smoke, batch=batch, rank=rank, alpha=alpha, steps=steps, warm=warm,
                              dev=dev, checkpointing=checkpointing)


def _timed_variant(name: str, *, smoke: bool, batch: int, rank: int, alpha: int, steps: int,
                   warm: int, dev: str, checkpointing: bool | None) -> dict[str, Any]:
    step, runner, opts, first_losses = make_step(name, smoke=smoke, batch=batch, rank=rank, alpha=alpha,
                                                 dev=dev, checkpointing=checkpointing)
    batch = opts["batch"]
    # the first step pays torch.compile and CUDA-graph capture: timed on its own
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if dev == "cuda":
        torch.cuda.synchronize()
    step.drain()
    first_step_s = time.perf_counter() - t0
    sec, peak, loss = timed_run(step, steps, max(0, warm - 1), dev)
    reserved = peak_reserved()
    fast = runner.fast
    warmups = [dict(shape=list(w.shape), seconds=round(w.seconds, 2)) for w in
               runner.executor.warmups]
    del runner, step
    if dev == "cuda":
        torch.cuda.empty_cache()
    return dict(variant=name, batch=batch, rank=rank, s_per_step=sec, img_per_s=batch / sec,
                peak_gib=peak, peak_reserved_gib=reserved, loss=loss, first_losses=first_losses, first_step_s=round(first_step_s, 2),
                graph_warmups=warmups, checkpointing=opts["checkpointing"],
                fast=dataclasses.asdict(fast))


def loss_checks(rows: list[dict[str, Any]], tol: float) -> list[dict[str, Any]]:
    """Each fast variant's first losses against the plain variant of the same batch and checkpointing.

    Step 1 runs on identical weights and inputs, so its loss must agree within bf16 tolerance;
    steps 2-3 follow after one/two optimizer steps and are shown too.
    """
    checks = []
    plain = {(r["batch"], r.get("checkpointing")): r for r in rows
             if "first_losses" in r and "_plain" in r["variant"]}
    for r in rows:
        if "first_losses" not in r or "_plain" in r["variant"]:
            continue
        ref = plain.get((r["batch"], r.get("checkpointing"))) or plain.get((r["batch"], False))
        if ref is None or not ref["first_losses"] or not r["first_losses"]:
            continue
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["first_losses"], ref["first_losses"])]
        checks.append(dict(variant=r["variant"], against=ref["variant"], rel_diff=rel, ok=rel[0] <= tol))
    return checks


SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, layers_per_block=2, sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")


def build_random_sd15(folder: Path, smoke: bool) -> Path:
    """A random-weight SD1.5-architecture model saved in diffusers format (the tiny model's
    CLIP-style tokenizer stands in for SD1.5's; both give 77 tokens)."""
    import shutil

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora.model import ensure_tiny_model

    torch.manual_seed(0)
    if smoke:
        tiny = ensure_tiny_model()
        shutil.copytree(tiny, folder, dirs_exist_ok=True)
        return folder
    UNet2DConditionModel(**SD15_UNET).to(torch.float16).save_pretrained(folder / "unet")
    AutoencoderKL(**SD15_VAE).to(torch.float16).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(torch.float16).save_pretrained(folder / "text_encoder")
    DDPMScheduler(**SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    shutil.copytree(ensure_tiny_model() / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    return folder


def make_dataset(root: Path, n: int, size: int) -> Path:
    """``n`` square synthetic images with captions and version v0001 (a fresh folder each call)."""
    import shutil

    from lora.testing.datasets import write_synthetic_dataset

    shutil.rmtree(root, ignore_errors=True)  # a reused --e2e-dir: versions are never overwritten
    return write_synthetic_dataset(root, n, [(size, size)], first_id=1000, compress_level=1,
                                   caption=lambda i: f"1girl, solo, tag{i % 7}, color{i % 5}")


def end_to_end(smoke: bool, work: Path, train_images: int, epochs: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """A whole phase2a run through ``lora.train.train``: caching, steps, validation, checkpoints."""
    from lora.config import resolve_config
    from lora.train import train

    t0 = time.perf_counter()
    model = build_random_sd15(work / "model", smoke)
    size = 64 if smoke else 512
    val = 50 if not smoke else 4
    data = make_dataset(work / "data", train_images + val, size)
    setup_s = time.perf_counter() - t0
    cfg = resolve_config("phase2a", {
        "model": str(model), "dataset": str(data), "resolution": size, "epochs": epochs,
        # the data set holds out val of its images (its split file is created by this run)
        "validation_fraction": val / (train_images + val),
        "validation_count": val, "validation_max": val, "checkpoint_every_minutes": 10.0, **overrides,
    })
    seen: list[dict] = []
    t1 = time.perf_counter()
    result = train(cfg, work / "run", on_progress=seen.append)
    wall = time.perf_counter() - t1
    log = json.loads((work / "run" / "training_log.json").read_text())
    steps = log.get("steps", [])
    rates = sorted(s["images_per_sec"] for s in steps if s.get("images_per_sec"))
    return dict(variant="e2e_phase2a", train_images=train_images, epochs=epochs, steps=result.global_step,
                image_steps=sum(s.get("images", 0) for s in steps), complete=result.complete,
                wall_s=round(wall, 1), setup_s=round(setup_s, 1), first_step_s=round(steps[0].get("images", 0)
                / steps[0]["images_per_sec"], 1) if steps and steps[0].get("images_per_sec") else None,
                median_img_per_s=rates[len(rates) // 2] if rates else None,
                final_loss=steps[-1]["loss"] if steps else None,
                final_val=(log.get("validation") or [{}])[-1].get("loss"), overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 timed steps (CPU test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20, smoke 2)")
    ap.add_argument("--warm", type=int, default=None, help="warm-up steps (default 5, smoke 1)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--peer", default=None,
                    help="path to peer_baselines.py (default: $ANIMELORA_PEER_BASELINES)")
    ap.add_argument("--no-peer", action="store_true", help="skip the diffusers-script baseline")
    ap.add_argument("--variants", default="diffusers_script_fp16,animelora_plain,animelora_plain_gc,"
                                          "animelora_fast,animelora_fast_gc")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="card's bf16 rate for MFU")
    ap.add_argument("--loss-tol", type=float, default=2e-2, help="relative loss difference allowed (bf16)")
    ap.add_argument("--e2e", action="store_true", help="also run a whole phase2a training run (600 images)")
    ap.add_argument("--e2e-images", type=int, default=600)
    ap.add_argument("--e2e-epochs", type=int, default=20)
    ap.add_argument("--e2e-dir", default=None, help="work folder for --e2e (default: a temporary one)")
    ap.add_argument("--out-name", default="bench_train.json", help="file name under $OUT")
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (2 if a.smoke else 20)
    warm = a.warm if a.warm is not None else (1 if a.smoke else 5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # under torchrun / accelerate launch each process trains its share of every step (the
    # trainer's own data parallelism); --batch and the images/s column are for all processes
    from lora.train.distributed import launched_rank

    rank, world = launched_rank()
    if dev == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports for all
    card = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    if world > 1:
        card = f"{world}x {card}"
    print("device", card, "torch", torch.__version__, "smoke" if a.smoke else "full SD1.5", flush=True)

    peer = None
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not a.no_peer and any(not v.startswith("animelora") for v in variants):
        path = find_peer(a.peer)
        if path is None:
            print("error: peer_baselines.py not found; pass --peer PATH (or set "
                  "ANIMELORA_PEER_BASELINES), or --no-peer", file=sys.stderr)
            return 2
        peer = load_peer(path)

    out = os.environ.get("OUT") if rank == 0 else None
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def save() -> None:
        if out:
            Path(out, a.out_name).write_text(json.dumps(
                {"device": card, "smoke": a.smoke, "rows": rows, **extra}, indent=1))

    for name in variants:
        try:
            if name.startswith("animelora"):
                row = animelora_variant(name, smoke=a.smoke, batch=a.batch, rank=16, alpha=64, steps=steps,
                                        warm=warm, dev=dev)
            elif peer is not None and world == 1:
                row = peer.run_variant(name, a.smoke, a.batch, 16, 64, steps, warm, dev)
            else:
                continue
            row["processes"] = world
            # MFU per card: the images/s of all processes over the rate of all their cards
            row["mfu"] = row["img_per_s"] * GFLOP_PER_IMAGE * 1e9 / (a.peak_tflops * 1e12 * world)
        except Exception as exc:  # noqa: BLE001 - OOM or an unsupported op: report it in the table
            row = dict(variant=name, batch=a.batch, error=f"{type(exc).__name__}: {exc}"[:300])
            if dev == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    extra["loss_checks"] = loss_checks(rows, a.loss_tol)
    save()
    if a.e2e:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            work = Path(a.e2e_dir) if a.e2e_dir else Path(tmp)
            try:
                extra["e2e"] = end_to_end(a.smoke, work, a.e2e_images, a.e2e_epochs, {})
            except Exception as exc:  # noqa: BLE001
                extra["e2e"] = dict(variant="e2e_phase2a", error=f"{type(exc).__name__}: {exc}"[:300])
        print(json.dumps(extra["e2e"]), flush=True)
        save()

    base = next((r for r in rows if r["variant"] == "diffusers_script_fp16" and "img_per_s" in r), None)
    print(f"card: {card}")
    print(f"{'variant':28s} {'batch':>5s} {'images/s':>9s} {'x peer':>7s} {'peak GiB':>9s} {'MFU':>6s} {'1st step s':>10s} {'reserved':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:28s} {r['batch']:>5d} ERROR {r['error'][:90]}")
            continue
        speed = f"{r['img_per_s'] / base['img_per_s']:7.2f}" if base else f"{'-':>7s}"
        first = f"{r['first_step_s']:10.1f}" if "first_step_s" in r else f"{'-':>10s}"
        res = f"{r['peak_reserved_gib']:8.2f}" if "peak_reserved_gib" in r else f"{'-':>8s}"
        print(f"{r['variant']:28s} {r['batch']:>5d} {r['img_per_s']:9.2f} {speed} {r['peak_gib']:9.2f} "
              f"{r['mfu']:6.1%} {first} {res}")
    for c in extra["loss_checks"]:
        print(f"loss check {c['variant']} vs {c['against']}: rel diff step1..3 "
              f"{', '.join(f'{x:.2e}' for x in c['rel_diff'])} -> {'OK' if c['ok'] else 'MISMATCH'}")
    if "e2e" in extra:
        print("e2e:", json.dumps(extra["e2e"]))
    bad = any("error" in r and r["variant"].startswith("animelora") for r in rows)
    bad = bad or any(not c["ok"] for c in extra["loss_checks"]) or "error" in extra.get("e2e", {})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
