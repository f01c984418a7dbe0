"""GroupNorm and LayerNorm that keep bf16/fp16 activations under autocast.

Why: autocast runs ``group_norm`` and ``layer_norm`` in fp32, so every norm of the UNet turns a
bf16 activation into an fp32 one and the convolution or projection after it casts it back
(and the backward does the same in reverse). In the eager step these casts are the largest
share of the GPU time (``direct_copy_kernel``, about half of an H200's eager phase2a step,
bench/README.md); a compiled step fuses them away, but a compile costs minutes per bucket shape.
The norms here read and write the activation's own dtype; PyTorch's kernels still accumulate
the mean and variance in fp32, so only the output's rounding changes (to the precision the
next layer computes in anyway).

The swap changes the class of each norm module in place (:class:`HalfGroupNorm` is a
``nn.GroupNorm``): names, parameters and state dicts stay, so checkpoints and LoRA files are
unaffected, and :func:`remove_half_norms` undoes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.bfloat16, torch.float16)


def _keeps_half(x: torch.Tensor) -> bool:
    """A bf16/fp16 activation under autocast: the case autocast would turn into fp32."""
    return x.dtype in _HALF and torch.is_autocast_enabled(x.device.type)


def _cast(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if p is None else p.to(dtype)


class HalfGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose output keeps a bf16/fp16 input's dtype under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _keeps_half(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class HalfLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose output keeps a bf16/fp16 input's dtype under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _keeps_half(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype),
                                self.eps)


_SWAPS = {nn.GroupNorm: HalfGroupNorm, nn.LayerNorm: HalfLayerNorm}
_BACK = {v: k for k, v in _SWAPS.items()}


def _swap_classes(module: nn.Module, table: dict[type, type]) -> int:
    count = 0
    for m in module.modules():
        new = table.get(type(m))
        if new is not None:
            m.__class__ = new
            count += 1
    return count


def install_half_norms(module: nn.Module) -> int:
    """Swap every plain ``nn.GroupNorm``/``nn.LayerNorm`` in ``module``; return how many.

    Only exact instances are swapped (a subclass with its own forward is left alone), so a
    second call swaps nothing."""
    return _swap_classes(module, _SWAPS)


def remove_half_norms(module: nn.Module) -> int:
    """Undo :func:`install_half_norms`; return how many norms were put back."""
    return _swap_classes(module, _BACK)


__all__ = ["HalfGroupNorm", "HalfLayerNorm", "install_half_norms", "remove_half_norms"]
