"""Where the trainer uses diffusers' own training helpers, it trains exactly as its own copies did.

``cast_training_params`` replaced the trainer's loops that upcast the LoRA weights to fp32:
these tests run the old loop and the helper side by side, on random mixed-precision modules and
on the tiny UNet with a bf16 base, and require the same parameters, dtypes and bits.
``compute_snr`` is not used (lora/train/step/loss.py says why); the project's min-SNR weights are
checked here to be the same quantity as the diffusers recipe, to float rounding.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params, compute_snr

from lora.config import resolve_config
from lora.train.step.loss import loss_weights


def _old_cast(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    """The loop the trainer had before (setup_lora_unet, and the text encoder branch)."""
    trainable: dict[str, torch.nn.Parameter] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
            trainable[f"{prefix}.{name}"] = p
    return trainable


def _random_mixed_module(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), torch.nn.LayerNorm(4))
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
            p.data = p.data.to((torch.bfloat16, torch.float16, torch.float32)[i % 3])
            p.requires_grad_(i % 2 == 0)
    return module


def _snapshot(module: torch.nn.Module) -> dict[str, tuple[torch.dtype, bool, torch.Tensor]]:
    return {n: (p.dtype, p.requires_grad, p.detach().clone()) for n, p in module.named_parameters()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert torch.equal(a[name][2], b[name][2]), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cast_training_params_is_the_old_loop_on_random_modules(seed):
    old, new = _random_mixed_module(seed), _random_mixed_module(seed)
    old_trainable = _old_cast(old, "m")
    cast_training_params(new, dtype=torch.float32)
    new_trainable = {f"m.{n}": p for n, p in new.named_parameters() if p.requires_grad}

    assert old_trainable.keys() == new_trainable.keys()
    assert all(p.dtype == torch.float32 for p in new_trainable.values())
    # the frozen half keeps its half-precision dtypes, so the cast really had work to do
    assert {p.dtype for p in new.parameters() if not p.requires_grad} - {torch.float32}
    _assert_same(_snapshot(old), _snapshot(new))
    # the returned objects are the module's own parameters (the optimizer must train those)
    assert all(p is dict(new.named_parameters())[k[2:]] for k, p in new_trainable.items())


def test_setup_lora_unet_with_a_bf16_base_matches_the_old_loop(tiny_model):
    from lora.model import attach_lora, load_components
    from lora.train.seeds import derive_seed
    from lora.train.setup.lora import keep_activation_dtype, setup_lora_unet

    cfg = resolve_config("phase2a", {"model": "tiny", "seed": 3})
    new_unet = load_components("tiny").unet
    trainable = setup_lora_unet(cfg, new_unet, "cpu", torch.bfloat16)

    old_unet = load_components("tiny").unet  # what setup_lora_unet did before, step by step
    old_unet.to("cpu", dtype=torch.bfloat16)
    attach_lora(old_unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                dropout=cfg.lora_dropout, init_seed=derive_seed(cfg.seed, "lora-init"))
    keep_activation_dtype(old_unet)
    old_trainable = _old_cast(old_unet, "unet")

    assert trainable and trainable.keys() == old_trainable.keys()
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert next(p for p in new_unet.parameters() if not p.requires_grad).dtype == torch.bfloat16
    _assert_same(_snapshot(old_unet), _snapshot(new_unet))


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_are_the_diffusers_recipe(schedule, prediction, gamma):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule=schedule, prediction_type=prediction)
    timesteps = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(0))

    snr = compute_snr(scheduler, timesteps)  # as in diffusers' train_text_to_image_lora.py
    expected = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    expected = expected / (snr + 1) if prediction == "v_prediction" else expected / snr

    ours = loss_weights(scheduler.alphas_cumprod, timesteps, gamma, prediction)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert loss_weights(scheduler.alphas_cumprod, timesteps, None, prediction) is None
