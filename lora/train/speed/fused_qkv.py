"""Fused q/k/v projections for the UNet's LoRA attention: one matrix product instead of three.

Why: at small batch (phase2a: batch 4) the SD1.5 UNet's attention projections are small GEMMs,
and with LoRA on ``to_q``/``to_k``/``to_v`` each one is three kernels forward (the frozen base
product and the two skinny LoRA products) and more backward, for ~128 LoRA layers. On a GPU
that many tiny kernels cost time in launches, not arithmetic. :class:`FusedLoraAttnProcessor`
computes a group of projections that read the same input (q, k, v of a self-attention; k, v of
a cross-attention) as

    base = x @ cat(Wq, Wk, Wv).T (+ cat(bias))      one GEMM
    h    = x @ cat(Aq, Ak, Av).T                     one GEMM, 3r outputs
    out  = base + h @ block_diag(Bq sq, Bk sk, Bv sv).T   one GEMM

and splits ``out`` into q, k, v (views). This is the same function peft computes per
projection (``base_layer(x) + lora_B(lora_A(x)) * scaling``), so training is unchanged.

What is *not* changed: no weight is copied, moved or re-registered. The concatenations are
made inside every forward from the live parameters (cheap: a few MB; a cached copy could go
stale after an optimizer step), gradients flow back to each ``lora_A``/``lora_B`` through
``cat``/``block_diag``, and the model's ``state_dict`` and peft's LoRA state dict are the same,
so checkpoints and exported LoRA files are interchangeable with the unfused model.

Where fusing would not be exact (peft merged or disabled adapters, several active adapters,
DoRA or another LoRA variant, a LoRA bias, LoRA dropout, a projection without LoRA while its
group has it, hooks or a patched ``forward`` on a projection), the processor calls the modules
exactly as diffusers' ``AttnProcessor2_0`` does; that is checked on every call, so a later
``merge``/``disable_adapters``/``set_adapter`` stays correct.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils import deprecate
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

__all__ = ["FusedLoraAttnProcessor", "fusable_adapter", "fused_projection", "install_fused_qkv", "remove_fused_qkv"]


# --------------------------------------------------------------------------------------------
# When is a group of projections fusable?


def _plain_call(module: nn.Module) -> bool:
    """Calling ``module`` runs its class's ``forward`` and nothing else: no hooks, no patched
    ``forward`` (accelerate's offload hooks, for one, replace the instance's ``forward``)."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


def _lora_adapter(layer: nn.Module) -> str | None:
    """The one adapter whose plain LoRA term peft adds in ``layer``'s forward, or None where
    peft's forward is anything other than ``base(x) + B(A(x)) * scaling`` with an nn.Linear base."""
    if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters or layer.fan_in_fan_out:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name not in layer.lora_B or name not in layer.lora_dropout:
        return None
    if name in layer.lora_variant or layer.use_dora.get(name, False) or name in layer.lora_magnitude_vector:
        return None
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(dropout) is not nn.Identity or type(layer.base_layer) is not nn.Linear:
        return None
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:  # lora_bias=True
        return None
    if not all(_plain_call(m) for m in (layer, layer.base_layer, lora_a, lora_b, dropout)):
        return None
    return name


def _same(values: Sequence[object]) -> bool:
    return all(v == values[0] for v in values[1:])


def fusable_adapter(layers: Sequence[nn.Module]) -> str | None:
    """The adapter name if ``layers`` (projections of one input) can be computed as one fused
    product exactly as peft computes them one by one; None otherwise."""
    if len(layers) < 2 or any(layer is None for layer in layers):
        return None
    names = [_lora_adapter(layer) for layer in layers]
    if names[0] is None or not _same(names):
        return None
    name = names[0]
    bases = [layer.base_layer.weight for layer in layers]
    lora_a = [layer.lora_A[name].weight for layer in layers]
    lora_b = [layer.lora_B[name].weight for layer in layers]
    biases = [layer.base_layer.bias for layer in layers]
    return name if (
        _same([(w.dtype, w.device, w.shape[1]) for w in bases])
        and _same([(w.dtype, w.device) for w in lora_a])
        and _same([(w.dtype, w.device) for w in lora_b])
        and all(b is None or b.dtype == bases[0].dtype for b in biases)
        and _same([getattr(layer, "cast_input_dtype_enabled", True) for layer in layers])
    ) else None


# --------------------------------------------------------------------------------------------
# The fused product


def _fused_bias(bases: Sequence[nn.Linear]) -> torch.Tensor | None:
    """The concatenated biases; zeros stand in for a projection without one."""
    if all(b.bias is None for b in bases):
        return None
    ref = bases[0].weight
    return torch.cat([
        b.bias if b.bias is not None else torch.zeros(b.out_features, dtype=ref.dtype, device=ref.device)
        for b in bases
    ])


def _lora_up(layers: Sequence[LoraLinear], name: str) -> torch.Tensor:
    """The up-projections, each scaled by its ``scaling``, as one block-diagonal matrix."""
    scales = [layer.scaling[name] for layer in layers]
    if _same(scales):  # the usual case: one multiply instead of one per projection
        return torch.block_diag(*[layer.lora_B[name].weight for layer in layers]) * scales[0]
    return torch.block_diag(*[layer.lora_B[name].weight * s for layer, s in zip(layers, scales)])


def fused_projection(layers: Sequence[LoraLinear], name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` for a :func:`fusable_adapter` group, in three GEMMs.

    Dtypes follow peft: the LoRA input is cast to the LoRA weights' dtype where the layer
    would cast it, and the sum is cast back to the base product's dtype."""
    bases = [layer.base_layer for layer in layers]
    result = F.linear(x, torch.cat([b.weight for b in bases]), _fused_bias(bases))
    result_dtype = result.dtype
    lora_x = layers[0]._cast_input_dtype(x, layers[0].lora_A[name].weight.dtype)
    down = F.linear(lora_x, torch.cat([layer.lora_A[name].weight for layer in layers]))
    result = (result + F.linear(down, _lora_up(layers, name))).to(result_dtype)
    return list(result.split([b.out_features for b in bases], dim=-1))


def _project(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The projections of ``x``: fused where exact, else each module called as usual."""
    name = fusable_adapter(layers)
    if name is None:
        return [layer(x) for layer in layers]
    return fused_projection(layers, name, x)


# --------------------------------------------------------------------------------------------
# The processor


class FusedLoraAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the q/k/v projections fused (see module docstring).

    Self-attention: q, k, v from one fused product (or k, v fused and q on its own where only
    q cannot be fused). Cross-attention: q through ``to_q``, k and v fused from the encoder
    states. ``previous`` is the processor :func:`remove_fused_qkv` puts back.
    """

    def __init__(self, previous: object | None = None) -> None:
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("FusedLoraAttnProcessor requires PyTorch 2.0 (F.scaled_dot_product_attention)")
        self.previous = previous

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored. Please remove "
                      "it; pass it through the pipeline's `cross_attention_kwargs` instead.")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # SDPA expects (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = self._qkv(attn, hidden_states, encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # q/k/v may be column slices of one fused product: viewing the last dim as
        # (heads, head_dim) keeps stride 1 in head_dim, which is all SDPA's kernels need.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear (peft's own forward)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _qkv(
        attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query, key, value as ``AttnProcessor2_0`` computes them, fusing what is exact."""
        if encoder_hidden_states is None:
            qkv = (attn.to_q, attn.to_k, attn.to_v)
            name = fusable_adapter(qkv)
            if name is not None:
                query, key, value = fused_projection(qkv, name, hidden_states)
                return query, key, value
            query = attn.to_q(hidden_states)
            encoder_hidden_states = hidden_states
        else:
            query = attn.to_q(hidden_states)
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = _project((attn.to_k, attn.to_v), encoder_hidden_states)
        return query, key, value


# --------------------------------------------------------------------------------------------
# Installing


def _installable(attn: Attention) -> bool:
    """Default processor and at least k/v fusable (then q joins them in self-attention where
    it is fusable too)."""
    return type(attn.processor) is AttnProcessor2_0 and fusable_adapter((attn.to_k, attn.to_v)) is not None


def install_fused_qkv(unet: nn.Module) -> int:
    """Give every ``Attention`` of ``unet`` whose k/v (and q) projections are fusable a
    :class:`FusedLoraAttnProcessor` remembering its current processor; return how many.

    Only modules on diffusers' default ``AttnProcessor2_0`` are changed (a custom processor is
    left alone), so a second call changes nothing. No parameter or buffer is added.
    """
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and _installable(module):
            module.set_processor(FusedLoraAttnProcessor(previous=module.processor))
            count += 1
    return count


def remove_fused_qkv(unet: nn.Module) -> int:
    """Put back the processor each :class:`FusedLoraAttnProcessor` replaced (a fresh
    ``AttnProcessor2_0`` for one set by hand without ``previous``); return how many."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, FusedLoraAttnProcessor):
            previous = module.processor.previous
            module.set_processor(previous if previous is not None else AttnProcessor2_0())
            count += 1
    return count
