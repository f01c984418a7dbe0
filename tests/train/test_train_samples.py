"""Samples drawn while a run trains (lora/train/samples.py): when, what, where, and that they
never change what is trained. The tiny model on the CPU; each run takes a few seconds."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora.config import ConfigError, SampleOptions
from lora.train import train
from lora.train.samples import overview_steps, resolve_settings, sample_epochs


def _log(run):
    return json.loads((run / "training_log.json").read_text())


def test_default_sets_at_step_0_epoch_ends_and_the_end_with_an_overview_grid(tmp_path, tiny_cfg):
    seen = []
    result = train(tiny_cfg(), tmp_path / "run", on_samples=seen.append)  # 8 steps, 3 per epoch
    assert result.complete
    run = tmp_path / "run"
    # step 0 (the base model), the ends of epochs 1 and 2, and the last step (in epoch 3)
    assert [r["step"] for r in _log(run)["samples"]] == [0, 3, 6, 8]
    assert [s.step for s in seen] == [0, 3, 6, 8]
    assert _log(run)["segments"][-1]["samples_count"] == 4
    meta = json.loads((run / "training_samples" / "step-8" / "samples.json").read_text())
    assert meta["step"] == 8 and meta["seeds"] == [0] and meta["resolution"] == 64
    assert [i["prompt"] for i in meta["images"]] == meta["prompts"] and len(meta["prompts"]) == 1  # tiny: one prompt
    for image in meta["images"]:
        with Image.open(run / "training_samples" / "step-8" / image["file"]) as img:
            assert img.size == (64, 64)
    # the LoRA changes what is drawn: the last set differs from step 0's
    first, last = (run / "training_samples" / f"step-{s}" / "p0_s0.png" for s in (0, 8))
    assert first.read_bytes() != last.read_bytes()
    grid = run / "training_samples" / "overview" / "grid.png"
    assert seen[-1].overview == grid
    with Image.open(grid) as img:  # 4 columns (one per set) beside the labels, one row
        assert img.width > 4 * 192 and 192 < img.height < 2 * 192


def test_prompt_file_seeds_and_every_steps_as_kohya_names_them(tmp_path, tiny_cfg):
    prompts = tmp_path / "prompts.txt"
    # kohya's per-line options are cut off (the samples settings apply to every prompt), never drawn as words
    prompts.write_text("# my prompts\nmychar, smile\n\n  # indented comment\n"
                       "mychar, from side --n lowres --w 512 --d 7\n", encoding="utf-8")
    cfg = tiny_cfg(samples={"prompts_file": str(prompts), "seeds": [3, 4], "every_steps": 5, "at_start": False,
                            "steps": 2, "resolution": 48})
    train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert [r["step"] for r in _log(run)["samples"]] == [5, 8]  # every 5 steps, and the last
    meta = json.loads((run / "training_samples" / "step-5" / "samples.json").read_text())
    assert meta["prompts"] == ["mychar, smile", "mychar, from side"] and meta["steps"] == 2
    assert [(i["prompt"], i["seed"], i["file"]) for i in meta["images"]] == [
        ("mychar, smile", 3, "p0_s3.png"), ("mychar, smile", 4, "p0_s4.png"),
        ("mychar, from side", 3, "p1_s3.png"), ("mychar, from side", 4, "p1_s4.png")]
    with Image.open(run / "training_samples" / "step-5" / "p1_s4.png") as img:
        assert img.size == (48, 48)


def test_sampling_changes_nothing_that_is_trained(tmp_path, tiny_cfg):
    """Same LoRA and losses with sets drawn after every step as with none: sampling consumes no
    training randomness and puts train mode back (lora_dropout would differ in eval mode)."""
    common = dict(lora_dropout=0.2, caption_shuffle=True, flip=True, max_steps=6)
    on = train(tiny_cfg(samples={"every_steps": 1}, **common), tmp_path / "on")
    off = train(tiny_cfg(samples="off", **common), tmp_path / "off")
    assert len(_log(tmp_path / "on")["samples"]) == 7 and not (tmp_path / "off" / "training_samples").exists()
    assert "samples" not in _log(tmp_path / "off")
    assert [s["loss"] for s in _log(tmp_path / "on")["steps"]] == [s["loss"] for s in _log(tmp_path / "off")["steps"]]
    a = load_file(str(on.lora_files[0]))
    b = load_file(str(off.lora_files[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_neither_repeats_nor_skips_a_set(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    cfg = tiny_cfg(checkpoint_every_steps=2)
    first = train(cfg, run, stop_at_step=4)
    assert first.global_step == 4 and [r["step"] for r in _log(run)["samples"]] == [0, 3]
    before = (run / "training_samples" / "step-3" / "p0_s0.png").stat().st_mtime_ns
    seen = []
    train(cfg, run, on_samples=seen.append)
    assert [s.step for s in seen] == [6, 8]  # step 0's and step 3's sets are not drawn again
    assert [r["step"] for r in _log(run)["samples"]] == [0, 3, 6, 8]
    assert (run / "training_samples" / "step-3" / "p0_s0.png").stat().st_mtime_ns == before
    reference = tmp_path / "reference"
    train(cfg, reference)
    for step in (0, 3, 6, 8):
        for image in json.loads((reference / "training_samples" / f"step-{step}" / "samples.json")
                                .read_text())["images"]:
            ours = run / "training_samples" / f"step-{step}" / image["file"]
            assert ours.read_bytes() == (reference / "training_samples" / f"step-{step}" / image["file"]).read_bytes()


def test_a_set_folder_holding_a_users_file_is_skipped_not_cleared(tmp_path, tiny_cfg, caplog):
    run = tmp_path / "run"
    mine = run / "training_samples" / "step-0" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes")
    with caplog.at_level(logging.WARNING, logger="lora.train"):
        result = train(tiny_cfg(max_steps=3), run)
    assert result.complete and mine.read_text() == "my notes"
    assert [r["step"] for r in _log(run)["samples"]] == [3]  # step 0's set was not drawn, the rest goes on
    assert any("samples at step 0 skipped" in r.getMessage() and "notes.txt" in r.getMessage()
               for r in caplog.records)


def test_a_missing_prompt_file_is_refused_before_the_model_loads(tmp_path, tiny_cfg):
    cfg = tiny_cfg(samples={"prompts_file": str(tmp_path / "nope.txt")})
    with pytest.raises(ConfigError, match="samples.prompts_file: .*nope.txt"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cadence_defaults_spread_sets_over_the_run():
    opts = SampleOptions()
    assert sample_epochs(opts, steps_per_epoch=163, total_steps=20 * 163) == {5, 10, 15, 20}  # phase2a
    assert sample_epochs(opts, steps_per_epoch=3, total_steps=8) == {1, 2, 3}
    assert sample_epochs(SampleOptions(every_epochs=4), 10, 100) == {4, 8}
    assert sample_epochs(SampleOptions(every_steps=50), 10, 100) is None
    assert SampleOptions.model_validate("off").enabled is False and SampleOptions.model_validate(True).enabled
    assert overview_steps(list(range(0, 200, 10)), limit=5) == [0, 50, 100, 140, 190]


def test_default_prompts_start_with_the_trigger_word():
    """A real model draws sample's five default prompts at 20 steps; the tiny one (noise at any
    prompt, seconds-long runs) the first of them at 4."""
    real = resolve_settings(SampleOptions(), tiny=False, resolution=512, trigger="mychar")
    assert len(real.prompts) == 5 and all(p.startswith("mychar, ") for p in real.prompts)
    assert (real.steps, real.seeds, real.resolution, len(real.rows)) == (20, (0,), 512, 5)
    tiny = resolve_settings(SampleOptions(), tiny=True, resolution=64, trigger=None)
    assert tiny.prompts == (real.prompts[0].removeprefix("mychar, "),)
    assert (tiny.steps, len(tiny.rows)) == (4, 1)


def test_the_overview_shrinks_each_sets_images_once_and_again_when_a_set_changes(tmp_path, monkeypatch):
    """The overview is rebuilt after every set; the copies made for earlier overviews are
    reused (the same grid, byte for byte), and a set written again since is shrunk again."""
    import os

    from lora.runpaths import SAMPLES_JSON, RunPaths
    from lora.train import samples as samples_mod
    from lora.train.samples import Thumbnails, TrainingSampleSettings, write_overview

    settings = TrainingSampleSettings(prompts=("a", "b"), negative_prompt="", seeds=(0, 1), steps=2,
                                      guidance=7.0, resolution=64)
    paths = RunPaths(tmp_path / "run")

    def write_set(step: int, shade: int) -> None:
        folder = paths.training_sample_set(step)
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for p, seed in settings.rows:
            name = f"p{p}_s{seed}.png"
            Image.new("RGB", (64, 64), (shade, 10 * p, 20 * seed)).save(folder / name)
            images.append({"file": name, "prompt": settings.prompts[p], "seed": seed})
        (folder / SAMPLES_JSON).write_text(json.dumps({"step": step, "images": images}))

    shrunk = []
    real = samples_mod._thumbnail
    monkeypatch.setattr(samples_mod, "_thumbnail", lambda path, out: shrunk.append(path.parent.name) or real(path, out))
    thumbnails = Thumbnails()
    for n, step in enumerate([0, 3, 6]):
        write_set(step, 40 * n)
        write_overview(paths, [0, 3, 6][:n + 1], settings, thumbnails)
    assert shrunk == ["step-0"] * 4 + ["step-3"] * 4 + ["step-6"] * 4  # each image once
    cached = paths.training_samples_grid.read_bytes()
    write_overview(paths, [0, 3, 6], settings)  # no copies kept: every image shrunk anew
    assert paths.training_samples_grid.read_bytes() == cached

    shrunk.clear()
    write_set(3, 200)  # the set of step 3 written again (a resumed run draws it anew)
    later = os.stat(paths.training_sample_set(3) / "p0_s0.png").st_mtime_ns + 10**9
    for image in paths.training_sample_set(3).glob("*.png"):
        os.utime(image, ns=(later, later))
    write_overview(paths, [0, 3, 6], settings, thumbnails)
    assert shrunk == ["step-3"] * 4
    assert paths.training_samples_grid.read_bytes() != cached
