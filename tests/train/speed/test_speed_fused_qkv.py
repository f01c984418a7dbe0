"""Fused q/k/v projections (lora/train/speed/fused_qkv.py) train exactly what peft's layers train.

A small SD1.5-shaped UNet with LoRA (random ``lora_B``, so the adapters matter) runs with
diffusers' default attention processors and with the fused ones; outputs and every LoRA
gradient must agree, under fp32 and bf16 autocast, channels-last and ``torch.compile``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lora.model.lora_layers import attach_lora
from lora.train.speed.fused_qkv import FusedLoraAttnProcessor, fusable_adapter, install_fused_qkv, remove_fused_qkv

# fp32: one fused product sums in another order than three; elements near zero differ by up
# to ~2e-6 on torch 2.13's CPU kernels (the outputs are O(1))
FP32 = {"rtol": 1e-5, "atol": 5e-6}
BF16 = {"rtol": 2e-2, "atol": 2e-2}
ALL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _attention_modules(unet: torch.nn.Module) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def _randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """lora_B starts at zero; give it values so the LoRA term changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_unet(targets=ALL_TARGETS, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).to(dtype)
    # alpha/rank = 2.5, not a power of two: the scaling's rounding shows if it is misplaced
    attach_lora(unet, rank=4, alpha=10, target_modules=targets, dropout=dropout, init_seed=0)
    _randomize_lora_b(unet)
    return unet


def make_inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    text = torch.randn(2, 7, 32, generator=g).to(dtype)
    target = torch.randn(2, 4, 8, 8, generator=g)
    return sample, torch.tensor([10, 500]), text, target


def forward_backward(fn, unet, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the LoRA gradients of an MSE loss (what a training step computes)."""
    sample, timesteps, text, target = inputs
    unet.zero_grad(set_to_none=True)
    out = fn(sample, timesteps, text).sample
    F.mse_loss(out.float(), target).backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_same_training(a, b, **tol) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, **tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert all("lora_" in n for n in grads_a)  # only the adapters train
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def count_fused_calls(monkeypatch) -> list[int]:
    """Count the fused products taken (so a silent fall-back cannot pass for fusing)."""
    from lora.train.speed import fused_qkv

    groups: list[int] = []
    real = fused_qkv.fused_projection

    def counting(layers, name, x):
        groups.append(len(layers))
        return real(layers, name, x)

    monkeypatch.setattr(fused_qkv, "fused_projection", counting)
    return groups


def test_fp32_outputs_and_lora_gradients_match_peft(monkeypatch):
    unet = make_unet()
    inputs = make_inputs()
    plain = forward_backward(unet, unet, inputs)
    assert install_fused_qkv(unet) == len(_attention_modules(unet))
    groups = count_fused_calls(monkeypatch)
    fused = forward_backward(unet, unet, inputs)
    assert sorted(groups) == [2] * 4 + [3] * 4  # k/v of each cross-attention, q/k/v of each self-attention
    assert_same_training(plain, fused, **FP32)
    assert all(g.abs().sum() > 0 for n, g in fused[1].items() if "attn" in n)  # every LoRA layer trains


def test_bf16_autocast_matches_within_bf16_tolerance():
    unet = make_unet()
    inputs = make_inputs()

    def autocast_forward(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(*args)

    plain = forward_backward(autocast_forward, unet, inputs)
    install_fused_qkv(unet)
    fused = forward_backward(autocast_forward, unet, inputs)
    assert fused[0].dtype == plain[0].dtype
    assert_same_training(plain, fused, **BF16)


def test_bf16_base_with_fp32_lora_keeps_peft_dtypes():
    """The trainer's setup: frozen base in bf16, LoRA in fp32, peft's input cast off, autocast."""
    unet = make_unet(dtype=torch.bfloat16)
    for m in unet.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n)
    attn = _attention_modules(unet)[0]
    x = torch.randn(2, 16, attn.to_q.in_features).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = [attn.to_q(x), attn.to_k(x), attn.to_v(x)]
        install_fused_qkv(unet)
        name = fusable_adapter((attn.to_q, attn.to_k, attn.to_v))
        assert name == "default"
        from lora.train.speed.fused_qkv import fused_projection

        got = fused_projection((attn.to_q, attn.to_k, attn.to_v), name, x)
        out_fused = unet(*make_inputs(torch.bfloat16)[:3]).sample
        remove_fused_qkv(unet)
        out_plain = unet(*make_inputs(torch.bfloat16)[:3]).sample
    assert [t.dtype for t in got] == [t.dtype for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **BF16)
    assert out_fused.dtype == out_plain.dtype
    torch.testing.assert_close(out_fused, out_plain, **BF16)


def test_install_counts_restores_and_adds_no_state():
    from peft import get_peft_model_state_dict

    unet = make_unet()
    modules = _attention_modules(unet)
    before = {id(m): m.processor for m in modules}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    lora = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    n_params = len(list(unet.parameters()))

    assert install_fused_qkv(unet) == len(modules) == 8  # 4 transformer blocks: attn1 (self) + attn2 (cross)
    assert all(isinstance(m.processor, FusedLoraAttnProcessor) for m in modules)
    assert install_fused_qkv(unet) == 0  # already fused
    assert len(list(unet.parameters())) == n_params and not list(unet.buffers())
    for got, want in ((unet.state_dict(), state), (get_peft_model_state_dict(unet), lora)):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k

    assert remove_fused_qkv(unet) == len(modules)
    assert all(m.processor is before[id(m)] for m in modules)
    assert remove_fused_qkv(unet) == 0


def test_lora_dropout_is_not_fused():
    unet = make_unet(dropout=0.1)
    assert install_fused_qkv(unet) == 0
    assert all(not isinstance(m.processor, FusedLoraAttnProcessor) for m in _attention_modules(unet))


@pytest.mark.parametrize("targets, installed", [
    (("to_q", "to_v"), 0),  # k without LoRA: k/v cannot be fused, nothing installed
    (("to_k", "to_v", "to_out.0"), 8),  # q without LoRA: k/v fused, q through its own module
])
def test_partial_targets_stay_exact(targets, installed, monkeypatch):
    unet = make_unet(targets=targets)
    inputs = make_inputs()
    plain = forward_backward(unet, unet, inputs)
    assert install_fused_qkv(unet) == installed
    # set the processor by hand everywhere too: its per-call fallback must be exact
    unet.set_attn_processor(FusedLoraAttnProcessor())
    groups = count_fused_calls(monkeypatch)
    assert_same_training(plain, forward_backward(unet, unet, inputs), **FP32)
    assert groups == [2] * installed


def test_adapter_state_changes_after_install_fall_back():
    """disable_adapters / merge after install: checked per call, so the output follows peft."""
    unet = make_unet()
    inputs = make_inputs()
    with torch.no_grad():
        install_fused_qkv(unet)
        unet.disable_adapters()
        disabled_fused = unet(*inputs[:3]).sample
        remove_fused_qkv(unet)
        disabled_plain = unet(*inputs[:3]).sample
        torch.testing.assert_close(disabled_fused, disabled_plain, **FP32)
        unet.enable_adapters()
        enabled = unet(*inputs[:3]).sample
        assert not torch.allclose(enabled, disabled_plain, **BF16)

        install_fused_qkv(unet)
        attn = _attention_modules(unet)[0]
        attn.to_k.merge()
        assert fusable_adapter((attn.to_q, attn.to_k, attn.to_v)) is None
        torch.testing.assert_close(unet(*inputs[:3]).sample, enabled, rtol=1e-4, atol=1e-5)


def test_channels_last():
    unet = make_unet()
    inputs = make_inputs()
    plain = forward_backward(unet, unet, inputs)
    unet.to(memory_format=torch.channels_last)
    assert install_fused_qkv(unet) == 8
    sample, timesteps, text, target = inputs
    cl_inputs = (sample.to(memory_format=torch.channels_last), timesteps, text, target)
    assert_same_training(plain, forward_backward(unet, unet, cl_inputs), **FP32)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    unet = make_unet()
    inputs = make_inputs()
    install_fused_qkv(unet)
    eager = forward_backward(unet, unet, inputs)
    compiled = forward_backward(torch.compile(unet, backend="aot_eager"), unet, inputs)
    assert_same_training(eager, compiled, **FP32)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# One Attention module: the cases SD1.5's UNet does not exercise (biases, masks, 4-D input,
# group norm, residual, output rescale).


def _attention(**kwargs):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(3)
    attn = Attention(**kwargs)
    attach_lora(attn, rank=4, alpha=10, init_seed=0)
    _randomize_lora_b(attn)
    assert type(attn.processor) is AttnProcessor2_0
    return attn


def _compare(attn, *args, **kwargs) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    def run(processor):
        attn.set_processor(processor)
        attn.zero_grad(set_to_none=True)
        x = args[0].clone().requires_grad_(True)
        out = attn(x, *args[1:], **kwargs)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return out.detach(), x.grad, grads

    (out_a, x_a, g_a), (out_b, x_b, g_b) = run(AttnProcessor2_0()), run(FusedLoraAttnProcessor())
    torch.testing.assert_close(out_b, out_a, **FP32)
    torch.testing.assert_close(x_b, x_a, **FP32)
    assert g_a.keys() == g_b.keys() and any("lora_A" in n for n in g_a)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("norm", [None, "layer_norm"])
def test_biased_projections_self_and_cross_with_mask(norm):
    g = torch.Generator().manual_seed(4)
    attn = _attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, bias=True,
                      cross_attention_norm=norm)
    x, ctx = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 24, generator=g)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    _compare(attn, x, ctx, attention_mask=mask)

    selfattn = _attention(query_dim=32, heads=4, dim_head=8, bias=True)
    assert fusable_adapter((selfattn.to_q, selfattn.to_k, selfattn.to_v)) == "default"
    _compare(selfattn, x)
    selfattn.to_k.base_layer.bias = None  # one projection without a bias: zeros stand in
    _compare(selfattn, x)


def test_4d_input_group_norm_residual_and_rescale():
    g = torch.Generator().manual_seed(5)
    attn = _attention(query_dim=32, heads=4, dim_head=8, bias=True, norm_num_groups=8,
                      residual_connection=True, rescale_output_factor=2.0, _from_deprecated_attn_block=True)
    _compare(attn, torch.randn(2, 32, 3, 4, generator=g))


def test_unequal_scalings():
    """set_scale / per-layer alphas: each B keeps its own scaling inside the block diagonal."""
    attn = _attention(query_dim=32, heads=4, dim_head=8)
    attn.to_k.scaling["default"] = 0.75
    attn.to_v.scaling["default"] = 4.0
    _compare(attn, torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(6)))


def test_peft_input_cast_and_result_dtype_without_autocast():
    """bf16 base, fp32 LoRA, peft's input cast on: LoRA runs in fp32, the sum returns to bf16."""
    from lora.train.speed.fused_qkv import fused_projection

    attn = _attention(query_dim=32, heads=4, dim_head=8)
    for m in (attn.to_q, attn.to_k, attn.to_v):
        m.base_layer.to(torch.bfloat16)
    qkv = (attn.to_q, attn.to_k, attn.to_v)
    x = torch.randn(2, 6, 32).to(torch.bfloat16)
    want = [m(x) for m in qkv]
    got = fused_projection(qkv, fusable_adapter(qkv), x)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16] * 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **BF16)


def _lora_to_bf16(attn):
    attn.to_k.lora_A["default"].to(torch.bfloat16)
    attn.to_k.lora_B["default"].to(torch.bfloat16)


def _cast_flag_off(attn):
    attn.to_k.cast_input_dtype_enabled = False


def _forward_hook(attn):
    attn.to_v.register_forward_hook(lambda module, args, out: out * 2)


def _patched_forward(attn):
    base = attn.to_v.forward
    attn.to_v.forward = lambda x, *a, **k: base(x, *a, **k) + 1


def _second_adapter(attn):
    from peft import LoraConfig, inject_adapter_in_model

    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
        warnings.simplefilter("ignore")
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_k"], init_lora_weights=False), attn,
                                adapter_name="other")
    for m in (attn.to_q, attn.to_v, attn.to_out[0]):
        m.set_adapter("default")
    attn.to_k.set_adapter(["default", "other"])  # only k runs two adapters


def _merged(attn):
    attn.to_k.merge()


@pytest.mark.parametrize("spoil", [_lora_to_bf16, _cast_flag_off, _forward_hook, _patched_forward,
                                   _second_adapter, _merged])
def test_not_fused_where_it_would_differ(spoil):
    """Fusing would change the result: the processor calls the modules, exactly as diffusers does."""
    attn = _attention(query_dim=32, heads=4, dim_head=8)
    spoil(attn)
    assert fusable_adapter((attn.to_q, attn.to_k, attn.to_v)) is None
    assert fusable_adapter((attn.to_k, attn.to_v)) is None
    assert install_fused_qkv(attn) == 0
    _compare(attn, torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(7)))


def test_dora_is_not_fused():
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(3)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "to_k", "to_v"]),
                            attn)
    assert fusable_adapter((attn.to_q, attn.to_k, attn.to_v)) is None
    assert install_fused_qkv(attn) == 0
    _randomize_lora_b(attn)
    _compare(attn, torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(8)))
