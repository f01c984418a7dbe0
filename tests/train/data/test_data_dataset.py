"""Data-set reading, the held-out split, buckets and the per-bucket crop."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from lora.train.data.buckets import buckets_for, load_for_bucket
from lora.train.data.dataset import DatasetError, read_dataset, split_items


def test_versions_latest_or_pinned_and_plain_folders(tmp_path, dataset):
    version, items = read_dataset(dataset)
    assert version == "v0001" and len(items) == 12
    assert items[0].name == "images/100.png" and items[0].caption.startswith("1girl, solo")
    with pytest.raises(DatasetError, match="no version 'v0009'"):
        read_dataset(dataset, "v0009")

    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.jpg", "c.png"]):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(plain / name)
    (plain / "a.txt").write_text("tag a")
    (plain / "sub" / "b.txt").write_text("tag b")  # c.png has no caption: not a training image
    version, items = read_dataset(plain)
    assert version == "folder" and [i.name for i in items] == ["a.png", "sub/b.jpg"]

    broken = tmp_path / "broken"
    (broken / "versions").mkdir(parents=True)
    (broken / "versions" / "v0001.json").write_text(json.dumps({"files": ["images/1.png"]}))
    with pytest.raises(DatasetError, match="images/1.png does not exist"):
        read_dataset(broken)
    with pytest.raises(DatasetError, match="no such folder"):
        read_dataset(tmp_path / "nothing")


def test_validation_split_is_the_data_sets_and_keeps_training_images(tmp_path):
    from lora.data.split import load_settings
    from lora.testing.datasets import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "d", 12, [(64, 64)])
    _, items = read_dataset(root)
    split = split_items(root, items, fraction=0.1)
    assert len(split.validation) == 1 and len(split.train) == 11
    assert split_items(root, items) == split  # recorded in the data set: the same every time
    small = write_synthetic_dataset(tmp_path / "small", 4, [(64, 64)])
    assert split_items(small, read_dataset(small)[1]).validation == []  # too small to hold out
    # the data set's own fraction (set when it is created) decides; a run's is used only when
    # nothing is recorded yet
    (tmp_path / "big").mkdir()
    load_settings(tmp_path / "big", 0.5)
    big = write_synthetic_dataset(tmp_path / "big", 40, [(64, 64)])
    _, many = read_dataset(big)
    assert split_items(big, many, fraction=0.1) == split_items(big, many, fraction=0.9)
    capped = split_items(big, many, fraction=0.5, limit=3)
    assert len(capped.held_out) == 20 and len(capped.validation) == 3 and len(capped.train) == 20


def test_kohya_buckets_and_cover_crop(tmp_path):
    b512 = buckets_for(512)
    for bucket in [(512, 512), (448, 576), (576, 448), (384, 640), (320, 704), (256, 832)]:
        assert bucket in b512
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in b512)
    b64 = buckets_for(64)
    assert (64, 64) in b64 and all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in b64)
    img = tmp_path / "wide.png"
    Image.new("RGBA", (300, 100), (255, 0, 0, 0)).save(img)
    x = load_for_bucket(img, (96, 32))
    assert x.shape == (3, 32, 96)
    assert float(x.min()) == pytest.approx(1.0)  # transparent pixels flattened onto white
