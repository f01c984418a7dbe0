"""The plain step executor on its own: one optimizer step of a tiny linear model, checked against
the same step written out by hand (the reference every other executor must match)."""
from __future__ import annotations

import math

import pytest
import torch

from lora.train.setup.accelerator import make_accelerator
from lora.train.step.executor import PendingStep, PlainExecutor


def _loss(weight: torch.Tensor):
    def micro_loss(lat, noise, t, ehs, n_total, sample_weight=None):
        per = ((lat @ weight - noise) ** 2).mean(dim=1)
        return per.sum() / n_total
    return micro_loss


def _inputs(g: torch.Generator, n: int):
    return (torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g), torch.zeros(n), torch.zeros(n))


@pytest.mark.parametrize("max_grad_norm", [None, 0.01])
def test_one_step_over_two_micro_batches_is_the_step_of_their_mean_loss(max_grad_norm):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 2, generator=g))
    start = weight.detach().clone()
    micro = [_inputs(g, 3), _inputs(g, 1)]
    optimizer = torch.optim.SGD([weight], lr=0.5)
    executor = PlainExecutor(_loss(weight), make_accelerator("no", cpu=True), optimizer, [weight], max_grad_norm, None)

    loss_sum, grad_norm = executor.queue(micro, n_total=4).values()

    # by hand: the mean loss over the step's four images, its gradient, clipping, one SGD step
    reference = start.clone().requires_grad_(True)
    lat = torch.cat([m[0] for m in micro])
    noise = torch.cat([m[1] for m in micro])
    mean = ((lat @ reference - noise) ** 2).mean(dim=1).mean()
    mean.backward()
    grad = reference.grad
    norm = float(grad.norm())
    if max_grad_norm and norm > max_grad_norm:
        grad = grad * (max_grad_norm / (norm + 1e-6))
    assert loss_sum == pytest.approx(float(mean.detach()), rel=1e-6)
    assert grad_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping is what is logged
    torch.testing.assert_close(weight.detach(), start - 0.5 * grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None  # gradients are zero (released) again after the step


def test_a_process_without_images_still_takes_part_and_pending_steps_read_on_the_cpu():
    weight = torch.nn.Parameter(torch.ones(3, 2))
    executor = PlainExecutor(_loss(weight), make_accelerator("no", cpu=True), torch.optim.SGD([weight], lr=0.1),
                             [weight], None, None)
    assert executor.queue([], n_total=2).values() == (0.0, 0.0)
    pending = PendingStep.of(torch.tensor(1.5), torch.tensor(float("inf")))
    assert pending.ready() and pending.values()[0] == 1.5 and math.isinf(pending.values()[1])
    assert executor.loss_scale_state() is None  # fp32: no loss scale to checkpoint
