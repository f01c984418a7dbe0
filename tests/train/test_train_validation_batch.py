"""Validation scores several same-shape held-out images per UNet call; an image's loss must not
depend on which images share its call, so runs validated either way compare."""
from __future__ import annotations

import pytest
import torch

from lora.train.data.fitting import _cut
from lora.train.validation import _same_shape_groups, validation_loss


def test_groups_share_one_shape_and_keep_every_image():
    lats = [torch.zeros(4, 8, 8), torch.zeros(4, 8, 12), torch.zeros(4, 8, 8), torch.zeros(4, 8, 8),
            torch.zeros(4, 8, 12)]
    assert _cut(_same_shape_groups(lats), 2) == [[0, 2], [3], [1, 4]]
    assert _cut(_same_shape_groups(lats), 1) == [[0], [2], [3], [1], [4]]


def test_batched_validation_scores_each_image_as_alone(tiny_model):
    from lora.model import load_components

    comps = load_components("tiny")
    g = torch.Generator().manual_seed(1)
    lats = [torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 12, generator=g),
            torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)]
    hidden = comps.text_encoder.config.hidden_size
    text = [torch.randn(77, hidden, generator=g) for _ in lats]
    names = ["a", "b", "c", "d"]
    args = (comps.unet, comps.noise_scheduler, lats, text, names, [100, 500, 900], "cpu")
    alone = validation_loss(*args, images_per_call=1)
    batched = validation_loss(*args, images_per_call=4)
    assert set(batched["per_image"]) == set(names)
    for name in names:
        torch.testing.assert_close(torch.tensor(batched["per_image"][name]), torch.tensor(alone["per_image"][name]),
                                   rtol=1e-4, atol=1e-6)
    assert abs(batched["loss"] - alone["loss"]) <= 1e-4 * abs(alone["loss"])
    assert list(batched["per_timestep"]) == ["100", "500", "900"]
    # a different set of neighbours leaves an image's figure where it was
    only_a = validation_loss(comps.unet, comps.noise_scheduler, lats[:1], text[:1], names[:1], [100, 500, 900],
                             "cpu", images_per_call=4)
    torch.testing.assert_close(torch.tensor(only_a["per_image"]["a"]), torch.tensor(alone["per_image"]["a"]),
                               rtol=1e-4, atol=1e-6)


class _CardLimit(torch.nn.Module):
    """The real tiny UNet on a 'card' that holds at most ``fits`` samples per call: larger
    calls raise torch's own out-of-memory error, as CUDA's allocator does."""

    def __init__(self, unet, fits: int) -> None:
        super().__init__()
        self.inner, self.fits, self.sizes = unet, fits, []

    def forward(self, x, t, ehs, return_dict=False):
        self.sizes.append(len(x))
        if len(x) > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} GiB")
        return self.inner(x, t, ehs, return_dict=return_dict)


def test_out_of_memory_halves_the_images_per_call_and_scores_them_all(tiny_model, caplog):
    import logging

    from lora.model import load_components

    comps = load_components("tiny")
    g = torch.Generator().manual_seed(2)
    lats = [torch.randn(4, 8, 8, generator=g) for _ in range(5)]
    text = [torch.randn(77, comps.text_encoder.config.hidden_size, generator=g) for _ in lats]
    names = [f"img{i}" for i in range(5)]
    timesteps = [100, 900]
    alone = validation_loss(comps.unet, comps.noise_scheduler, lats, text, names, timesteps, "cpu",
                            images_per_call=1)
    card = _CardLimit(comps.unet, fits=2 * len(timesteps))  # two images per call fit
    torch.backends.cudnn.benchmark = True
    try:
        with caplog.at_level(logging.WARNING, logger="lora.train.validation"):
            heard = []
            got = validation_loss(card, comps.noise_scheduler, lats, text, names, timesteps, "cpu",
                                  images_per_call=4, on_smaller=heard.append)
        assert torch.backends.cudnn.benchmark  # the training step's setting is given back
    finally:
        torch.backends.cudnn.benchmark = False
    assert card.sizes == [8, 4, 4, 2]  # 4 images failed; then 2 + 2, and the fifth alone
    assert heard == [2]  # the trainer starts the next evaluation at 2
    assert any("going on 2 at a time" in r.getMessage() for r in caplog.records)
    for name in names:
        torch.testing.assert_close(torch.tensor(got["per_image"][name]), torch.tensor(alone["per_image"][name]),
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit: a real error
        validation_loss(_CardLimit(comps.unet, fits=1), comps.noise_scheduler, lats[:1], text[:1], names[:1],
                        timesteps, "cpu")
