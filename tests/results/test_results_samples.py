"""Sample grids with the tiny model on CPU: real diffusers pipeline, real LoRA files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from animelora.cli import main
from lora.sample import SampleError, SampleRequest, generate_samples


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_grid_json_and_lora_changes_the_image(sampled, lora_runs, sample_prompts):
    run_a, _ = lora_runs
    out = run_a / "samples"
    assert sampled.grid_path == out / "grid.png"
    meta = json.loads((out / "samples.json").read_text())
    assert meta["columns"] == ["base", "tiny-a", "tiny-b"]
    assert meta["prompts"] == sample_prompts and meta["seeds"] == [0, 1]
    assert len(meta["images"]) == 3 * 2 * 2
    for record in meta["images"]:
        for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler",
                    "lora_scale", "file"):
            assert key in record
        assert (out / record["file"]).is_file()
        assert record["lora_scale"] == (None if record["column"] == "base" else 1.0)
    assert meta["negative_prompt"] and meta["scheduler"] == "euler_a" and meta["steps"] == 4

    def image(column, prompt, seed):
        (rec,) = [r for r in meta["images"]
                  if r["column"] == column and r["prompt"] == prompt and r["seed"] == seed]
        return _pixels(out / rec["file"])

    for prompt in sample_prompts:
        base = image("base", prompt, 0)
        assert base.shape == (64, 64, 3)
        for column in ("tiny-a", "tiny-b"):
            assert np.abs(image(column, prompt, 0) - base).mean() > 2.0, column
        assert np.abs(image("tiny-a", prompt, 0) - image("tiny-b", prompt, 0)).mean() > 2.0
    # The seed matters: a different seed gives a different base image.
    assert np.abs(image("base", sample_prompts[0], 0) - image("base", sample_prompts[0], 1)).mean() > 2.0

    with Image.open(out / "grid.png") as grid:
        width, height = grid.size
    # 4 rows (2 prompts x 2 seeds) and 3 columns of at least 192 px cells, plus labels.
    assert height >= 4 * 192 and width >= 3 * 192


def test_same_seeds_give_identical_images(sampled, lora_runs, sample_prompts, tmp_path):
    run_a, _ = lora_runs
    again = generate_samples("tiny", run_a, tmp_path / "again",
                             SampleRequest(prompts=sample_prompts, seeds=(0, 1)), device="cpu")
    assert again.columns == ["base", "tiny-a"]
    first = {(r.column, r.prompt, r.seed): r.file for r in sampled.images}
    for record in again.images:
        a = _pixels(sampled.out_dir / first[(record.column, record.prompt, record.seed)])
        b = _pixels(again.out_dir / record.file)
        assert np.array_equal(a, b), record


def test_missing_lora_and_missing_lcm_weights_fail_clearly(lora_runs, tmp_path):
    empty_run = tmp_path / "runs" / "unfinished"
    empty_run.mkdir(parents=True)
    with pytest.raises(SampleError, match="no LoRA weights") as info:
        generate_samples("tiny", empty_run, tmp_path / "out")
    assert str(empty_run / "lora") in str(info.value)
    missing = tmp_path / "lcm-lora-sdv1-5" / "pytorch_lora_weights.safetensors"
    with pytest.raises(SampleError, match="LCM-LoRA weights not found") as info:
        generate_samples("tiny", lora_runs[0], tmp_path / "out", SampleRequest(lcm_lora=missing))
    assert str(missing) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_lcm_lora_switches_scheduler_steps_and_guidance(lora_runs, tmp_path):
    # Any local LoRA file exercises the LCM path: its own adapter, the LCM scheduler.
    lcm = tmp_path / "lcm" / "pytorch_lora_weights.safetensors"
    lcm.parent.mkdir()
    shutil.copyfile(lora_runs[1] / "lora" / "pytorch_lora_weights.safetensors", lcm)
    result = generate_samples("tiny", lora_runs[0], tmp_path / "out",
                              SampleRequest(prompts=["1girl"], seeds=(3,), lcm_lora=lcm), device="cpu")
    meta = json.loads(result.json_path.read_text())
    assert meta["scheduler"] == "lcm" and meta["guidance"] == 1.0 and meta["steps"] == 4
    assert meta["lcm_lora"] is True
    assert len(result.images) == 2 and result.grid_path.is_file()


def test_cli_sample_uses_the_run_config_model(run_copy, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt\n1girl, anime watercolor style, masterpiece\n")
    out = tmp_path / "cli-samples"
    code = main(["sample", "--run", str(run_copy), "--prompts", str(prompts), "--seeds", "7",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "grid:" in capsys.readouterr().out
    meta = json.loads((out / "samples.json").read_text())
    assert meta["base_model"] == "tiny" and meta["seeds"] == [7]
    assert [r["column"] for r in meta["images"]] == ["base", "tiny-a"]


def test_cli_sample_errors(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    run = tmp_path / "bare"
    run.mkdir()
    assert main(["sample", "--run", str(run)]) == 2
    assert "no base model" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--model", "tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no LoRA weights" in err[0]
    with pytest.raises(SystemExit) as info:
        main(["sample", "--run", str(run), "--seeds", "a,b"])
    assert info.value.code == 2


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _sample_cli(run, out, tmp_path, *extra) -> list[str]:
    prompts = tmp_path / "one-prompt.txt"
    prompts.write_text("1girl, anime watercolor style\n")
    return ["sample", "--run", str(run), "--model", "tiny", "--prompts", str(prompts), "--seeds", "0",
            "--device", "cpu", "--out", str(out), *extra]


def test_cli_sample_out_never_deletes_what_it_did_not_write(lora_runs, tmp_path, capsys, monkeypatch):
    run = lora_runs[0]
    # a folder of the user's: refused, untouched
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me\n")
    (mine / "sub" / "photo.png").write_bytes(b"not really a png")
    assert main(_sample_cli(run, mine, tmp_path)) == 2
    assert "holds files animelora did not write" in _one_error_line(capsys)
    assert (mine / "notes.txt").read_text() == "keep me\n" and (mine / "sub" / "photo.png").is_file()
    # a file: refused, untouched
    a_file = tmp_path / "grid.png"
    a_file.write_bytes(b"user file")
    assert main(_sample_cli(run, a_file, tmp_path)) == 2
    assert "is a file" in _one_error_line(capsys)
    assert a_file.read_bytes() == b"user file"
    # the current folder: one line, no traceback
    monkeypatch.chdir(mine)
    assert main(_sample_cli(run, ".", tmp_path)) == 2
    assert "current folder" in _one_error_line(capsys)
    # the run folder itself
    assert main(_sample_cli(run, run, tmp_path)) == 2
    assert "run folder" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_sample_replaces_only_its_own_folder(lora_runs, tmp_path, capsys, monkeypatch):
    import os
    import stat

    run = lora_runs[0]
    out = tmp_path / "samples"
    old_umask = os.umask(0o022)
    try:
        assert main(_sample_cli(run, out, tmp_path)) == 0, capsys.readouterr().err
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    finally:
        os.umask(old_umask)
    # readable by other users (a web UI container, another worker), like any open()/mkdir output
    assert {oct(m) for p, m in modes.items() if p.is_file()} == {"0o644"}
    assert {oct(m) for p, m in modes.items() if p.is_dir()} == {"0o755"}
    assert (out / ".animelora-samples").is_file()
    first = json.loads((out / "samples.json").read_text())
    # its own earlier output is replaced as a whole, atomically
    assert main(_sample_cli(run, out, tmp_path, "--seeds", "5")) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert first["seeds"] == [0] and meta["seeds"] == [5]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["base_p0_s5.png", "tiny-a_p0_s5.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".samples")]
    # once the user adds a file of their own, the folder is no longer replaced
    (out / "images" / "favourite.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(_sample_cli(run, out, tmp_path)) == 2
    assert "favourite.png" in _one_error_line(capsys)
    assert (out / "images" / "favourite.png").read_bytes() == b"mine"


def test_cli_sample_usage_errors_exit_2(lora_runs, tmp_path, capsys):
    import torch

    run = lora_runs[0]
    if not torch.cuda.is_available():
        assert main(_sample_cli(run, tmp_path / "o", tmp_path, "--device", "cuda")) == 2
        assert "no CUDA device" in _one_error_line(capsys)
    assert main(_sample_cli(run, tmp_path / "o", tmp_path, "--device", "warp-drive")) == 2
    assert "not a device name" in _one_error_line(capsys)
    assert main(_sample_cli(run, tmp_path / "o", tmp_path, "--steps", "0")) == 2
    assert "steps must be > 0" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_request_says_what_is_rendered_and_is_refused_before_any_model_loads(lora_runs, tmp_path):
    from lora.sample import SampleUsageError

    run = lora_runs[0]
    tiny = SampleRequest(prompts=["1girl"], seeds=[2, 1, 2]).resolve("tiny", [run])
    assert (tiny.prompts, tiny.seeds, tiny.steps, tiny.guidance, tiny.resolution) == (("1girl",), (2, 1), 4, 7.0, 64)
    full = SampleRequest(trigger_word="mystyle").resolve("stable-diffusion-v1-5/stable-diffusion-v1-5", [run])
    assert full.steps == 20 and full.resolution == 512 and full.scheduler == "euler_a"
    assert all(p.startswith("mystyle, ") for p in full.prompts)
    # what the caller asked for is a value: the same request samples the same way again
    assert SampleRequest(seeds=[0, 1]) == SampleRequest(seeds=(0, 1))
    for bad, message in ((SampleRequest(resolution=60), "multiple of 8"),
                         (SampleRequest(scheduler="warp"), "unknown scheduler"),
                         (SampleRequest(prompts=[" "]), "non-empty strings")):
        with pytest.raises(SampleUsageError, match=message):
            generate_samples("no/such-model", run, tmp_path / "out", bad, device="cpu")
    assert not (tmp_path / "out").exists()
