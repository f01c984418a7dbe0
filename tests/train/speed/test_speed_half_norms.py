"""Half-precision norms (lora/train/speed/half_norms.py): bf16 activations stay bf16 through the
UNet's norms under autocast, nothing saved or trained changes shape, the switch is decided
per run and can be undone.

CUDA's autocast runs group_norm/layer_norm in fp32; CPU's does not, so the tests emulate
CUDA's rule with a function mode (what the swap must defeat) instead of needing a GPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lora.config import resolve_config
from lora.train.speed import compile as speed_compile
from lora.train.speed import options as speed_options
from lora.train.speed.options import FastOptions, resolve_fast_options
from lora.train.speed.half_norms import HalfGroupNorm, HalfLayerNorm, install_half_norms, remove_half_norms


class _CudaAutocastNormRule(TorchFunctionMode):
    """CUDA autocast's rule for norms, on CPU: under autocast they compute and return fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.group_norm, F.layer_norm) and torch.is_autocast_enabled("cpu"):
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _block() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                         nn.Conv2d(32, 32, 1)).to(torch.bfloat16)


def test_norms_keep_bf16_activations_where_autocast_would_make_them_fp32():
    block, x = _block(), torch.randn(2, 4, 8, 8)
    seen: list[torch.dtype] = []
    block[1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with _CudaAutocastNormRule(), torch.autocast("cpu", dtype=torch.bfloat16):
        stock = block(x)
    assert seen == [torch.float32]  # what the eager step pays for: a cast there and back
    assert install_half_norms(block) == 1 and isinstance(block[1], HalfGroupNorm)
    with _CudaAutocastNormRule(), torch.autocast("cpu", dtype=torch.bfloat16):
        half = block(x)
    assert seen[-1] == torch.bfloat16
    # same function: the statistics are still accumulated in fp32, only the rounding differs
    torch.testing.assert_close(half.float(), stock.float(), atol=0.05, rtol=0.05)
    ln = nn.LayerNorm(16).to(torch.bfloat16)
    install_half_norms(ln)
    with _CudaAutocastNormRule(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(torch.randn(2, 5, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fp32_activations_and_no_autocast_take_the_stock_norm():
    block = _block().float()
    install_half_norms(block)
    x = torch.randn(2, 4, 8, 8)
    swapped = block(x)
    remove_half_norms(block)
    torch.testing.assert_close(swapped, block(x), atol=0, rtol=0)


def test_swap_keeps_names_and_weights_and_can_be_undone(tiny_model):
    from lora.model import load_components

    unet = load_components("tiny").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    norms = sum(type(m) in (nn.GroupNorm, nn.LayerNorm) for m in unet.modules())
    assert install_half_norms(unet) == norms > 0
    assert install_half_norms(unet) == 0  # a second call swaps nothing
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, HalfLayerNorm) for m in unet.modules())
    assert remove_half_norms(unet) == norms
    assert not any(isinstance(m, (HalfGroupNorm, HalfLayerNorm)) for m in unet.modules())


def test_auto_turns_half_norms_on_for_an_uncompiled_cuda_step():
    cfg = resolve_config("phase2a", {"model": "tiny"})
    short = resolve_fast_options(cfg, "cuda", total_steps=3000, shapes=5)  # no compile: eager kernels in graphs
    assert short.half_norms and not short.compile
    line = speed_options.describe_fast_options(short, cfg, shapes=5, total_steps=3000, mixed_precision="bf16")
    assert "half-norms" in line
    assert not resolve_fast_options(cfg, "cuda").half_norms  # the compiled UNet fuses the casts itself
    assert not resolve_fast_options(cfg, "cpu").half_norms  # CPU keeps the plain path
    assert resolve_fast_options(resolve_config("phase2a", {"model": "tiny", "half_norms": "on"}), "cpu").half_norms
    off = resolve_config("phase2a", {"model": "tiny", "half_norms": "off", "compile": "off"})
    assert not resolve_fast_options(off, "cuda").half_norms


def test_prepare_forward_installs_them(tiny_model):
    from lora.model import load_components

    unet = load_components("tiny").unet
    speed_compile.prepare_forward(unet, FastOptions(half_norms=True))
    assert any(isinstance(m, HalfGroupNorm) for m in unet.modules())
