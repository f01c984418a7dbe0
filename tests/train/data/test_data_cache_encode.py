"""The latent cache fits the card: an out-of-memory error while encoding halves the batch and
loses nothing; any other error still stops the build."""
from __future__ import annotations

import logging

import pytest
import torch

from lora.train.data.cache import LatentEncoder


class CardLimit(torch.nn.Module):
    """The real tiny VAE on a 'card' that holds at most ``fits`` images per encode: larger
    batches raise torch's own out-of-memory error, as CUDA's allocator does."""

    def __init__(self, vae, fits: int) -> None:
        super().__init__()
        self.inner, self.fits, self.sizes = vae, fits, []

    def encode(self, x: torch.Tensor):
        self.sizes.append(len(x))
        if len(x) > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} GiB")
        return self.inner.encode(x)


@pytest.fixture(scope="module")
def vae(tiny_model):
    from lora.model import load_components

    return load_components("tiny").vae


def _pixels(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_out_of_memory_halves_the_batch_and_encodes_every_image(vae, caplog):
    pixels = _pixels(7)
    expected = torch.cat([LatentEncoder(vae, "cpu", 0.5, batch=1).encode(pixels[i:i + 1]) for i in range(7)])
    limited = CardLimit(vae, fits=2)
    encoder = LatentEncoder(limited, "cpu", 0.5, batch=8)
    with caplog.at_level(logging.WARNING, logger="lora.train.data.cache"):
        got = encoder.encode(pixels)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert encoder.batch == 2  # kept for the rest of the cache: later chunks do not fail again
    assert limited.sizes[:2] == [7, 4] and max(limited.sizes[2:]) == 2
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 2 and "going on 2 at a time" in warnings[-1]
    limited.sizes.clear()
    encoder.encode(pixels[:4])
    assert limited.sizes == [2, 2]


def test_out_of_memory_at_one_image_and_other_errors_stop_the_build(vae):
    with pytest.raises(torch.OutOfMemoryError):
        LatentEncoder(CardLimit(vae, fits=0), "cpu", 0.5, batch=4).encode(_pixels(2))

    class Broken(CardLimit):
        def encode(self, x):
            raise ValueError("bad pixels")

    encoder = LatentEncoder(Broken(vae, fits=8), "cpu", 0.5, batch=4)
    with pytest.raises(ValueError, match="bad pixels"):
        encoder.encode(_pixels(4))
    assert encoder.batch == 4
