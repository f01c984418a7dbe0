"""What one held-out validation call keeps in GPU memory, counted on the CPU.

Why: at defaults a run holds the CUDA graphs' memory plus what its largest eager validation call
uses (one UNet forward over ``images x timesteps`` rows of one latent shape), and the images per
call (lora/train/validation.py's ``IMAGES_PER_CALL``) trade that memory against validation time.
A card is not always to hand, so this counts it without one: an SD1.5-shaped UNet with the
trainer's LoRA and fused q/k/v runs on PyTorch's meta device (tensors with shapes and dtypes but
no memory and no arithmetic), and every tensor the forward makes is counted from its creation
until its last reference goes; the table gives the peak of the bytes alive at once. Attention is
counted as the fused kernels a card runs (its output only, no score matrix); activations are
bf16 throughout, as with the default half-precision norms. What the allocator holds on a card
is this plus its rounding and caching (bench/README.md compares the two).

    python bench/validation_memory.py [--images 1,2,4] [--shapes 64x64,96x64,88x72]
    python bench/validation_memory.py --smoke      # a tiny UNet (the test)

Writes ``$OUT/bench_validation_memory.json`` when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import SD15_UNET, SMOKE_UNET  # noqa: E402  (bench/train.py)

#: latent shapes of the guide's Danbooru buckets: 512x512, 768x512 (and 512x768), 704x576
DEFAULT_SHAPES = "64x64,96x64,88x72"


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages that tensors made under this mode keep alive, and their peak.

    A storage counts once however many views share it, from the first tensor made on it until
    the last of those tensors is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage -> [tensors on it, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]


class FusedAttention(TorchFunctionMode):
    """Scaled-dot-product attention as flash/efficient/cuDNN kernels run it: the output alone.

    Why: on the meta device PyTorch picks its math fallback, which would count a score matrix
    (rows x heads x tokens x tokens) that the card's kernels never make."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **(kwargs or {}))


def build_unet(smoke: bool):
    """The UNet as the trainer validates it: frozen weights, LoRA (rank 16), fused q/k/v, bf16."""
    from diffusers import UNet2DConditionModel

    from lora.config import resolve_config
    from lora.train.setup.lora import setup_lora_unet
    from lora.train.speed.fused_qkv import install_fused_qkv

    unet_cfg = SMOKE_UNET if smoke else SD15_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.requires_grad_(False)
    cfg = resolve_config("phase2a", {"lora_rank": 16, "lora_alpha": 64})
    setup_lora_unet(cfg, unet, torch.device("meta"), torch.bfloat16)
    install_fused_qkv(unet)
    # no autocast on the meta device: the fp32 LoRA weights take the activations' dtype instead
    for param in unet.parameters():
        param.data = param.data.to(torch.bfloat16)
    return unet.eval(), unet_cfg["cross_attention_dim"]


def peak_bytes(unet, context_dim: int, rows: int, height: int, width: int) -> int:
    """The peak bytes alive during one no-grad forward of ``rows`` rows at one latent shape."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    latents = torch.empty(rows, 4, height, width, **meta)
    text = torch.empty(rows, 77, context_dim, **meta)
    timesteps = torch.zeros(rows, dtype=torch.long, device="meta")
    counter = LiveBytes()
    with torch.no_grad(), FusedAttention(), counter:
        pred = unet(latents, timesteps, text, return_dict=False)[0]
        del pred
    return counter.peak


def parse_shape(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="1,2,4", help="held-out images per validation call")
    ap.add_argument("--timesteps", type=int, default=5, help="timesteps scored per image (the default 5)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="latent shapes, HxW (an image's size / 8)")
    ap.add_argument("--smoke", action="store_true", help="a tiny UNet, small shapes (the test)")
    args = ap.parse_args(argv)
    shapes = [parse_shape(s) for s in ("8x8,12x8" if args.smoke else args.shapes).split(",")]
    unet, context_dim = build_unet(args.smoke)
    rows = []
    print("| images a call | rows (x timesteps) | latent | image | peak in use, GiB |")
    print("| --- | --- | --- | --- | --- |")
    for images in (int(i) for i in args.images.split(",")):
        for height, width in shapes:
            n = images * args.timesteps
            peak = peak_bytes(unet, context_dim, n, height, width)
            rows.append({"images": images, "rows": n, "latent": [height, width], "peak_bytes": peak})
            print(f"| {images} | {n} | {height}x{width} | {height * 8}x{width * 8} | {peak / 2**30:.2f} |")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_validation_memory.json"
        path.write_text(json.dumps({"timesteps": args.timesteps, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
