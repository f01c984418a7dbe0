"""The latent cache's images are prepared on threads ahead of the VAE (lora/train/data/prefetch.py):
the same tensors, in the same order, as preparing each in place; a broken image still stops the
build with its own error, when its turn comes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from lora.train.data.buckets import load_for_bucket
from lora.train.data.prefetch import PreparedImages, threaded_map


def _images(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = (96 + 16 * (i % 3), 64 + 24 * (i % 2))
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_give_the_same_tensors_in_the_same_order(tmp_path, threads):
    paths = _images(tmp_path, 11)
    jobs = [(p, (64, 48) if i % 2 else (48, 64)) for i, p in enumerate(paths)]
    expected = [load_for_bucket(p, b) for p, b in jobs]
    got = []
    with PreparedImages(jobs, threads=threads, ahead=2) as prepared:
        for n in (1, 4, 2, 4):  # the VAE's batch may shrink on an out-of-memory error
            got += prepared.take(n)
        with pytest.raises(IndexError):
            prepared.take(1)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_a_broken_image_raises_its_own_error_when_taken(tmp_path):
    paths = _images(tmp_path, 3)
    paths[2].write_bytes(b"not an image")
    with PreparedImages([(p, (48, 48)) for p in paths], threads=2) as prepared:
        assert len(prepared.take(2)) == 2  # the ones before it are not lost
        with pytest.raises(UnidentifiedImageError):
            prepared.take(1)


def test_threaded_map_keeps_the_order():
    assert threaded_map(lambda v: v * v, range(20), threads=4) == [v * v for v in range(20)]
