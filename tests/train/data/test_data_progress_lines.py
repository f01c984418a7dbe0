"""Long library work (the latent cache, here) shows progress where no terminal is: plain log
lines that a pipe, a log file or the Prefect UI shows (lora/progress.py)."""
from __future__ import annotations

import logging

from PIL import Image

from lora.progress import Progress, count_line


def test_lines_at_the_first_update_every_interval_and_the_last(caplog):
    now = [100.0]
    caplog.set_level(logging.INFO, logger="lora.progress")
    with Progress(10, "caching latents", every_s=15.0, interactive=False, clock=lambda: now[0]) as bar:
        for _ in range(10):
            now[0] += 2.0  # 2 s per image
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    # first image, the one 16 s after it (the first line + 15 s), and the last
    assert lines == ["caching latents: 1/10 img (10%)",
                     "caching latents: 9/10 img (90%), 0.5 img/s, eta 0:02",
                     "caching latents: 10/10 img (100%), 0.5 img/s, eta 0:00"]


def test_nothing_to_do_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="lora.progress")
    with Progress(0, "caching text", interactive=False):
        pass
    assert caplog.records == []


def test_line_without_a_total_or_a_rate():
    assert count_line("downloading", 3, None, None) == "downloading: 3 img"
    assert count_line("caching text", 5, 20, 2.5, unit="caption") == \
        "caching text: 5/20 caption (25%), 2.5 caption/s, eta 0:06"


def test_the_latent_cache_reports_its_images_without_a_terminal(tiny_model, tmp_path, caplog):
    from lora.model import load_components
    from lora.train.data.cache import build_cache
    from lora.train.data.dataset import Item

    comps = load_components("tiny")
    items = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(path)
        items.append(Item(name=path.name, image=path, caption=f"tag{i}"))
    caplog.set_level(logging.INFO, logger="lora.train.data.cache")
    build_cache(items, [(64, 64)] * 3, root=tmp_path / "cache", model_id="tiny", vae=comps.vae,
                text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, resolution=64, flip=False,
                device="cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("caching latents: ") and "3/3 img (100%)" in line for line in lines), lines
    assert any(line.startswith("caching text: ") and "3/3 caption (100%)" in line for line in lines), lines
