"""bench/train.py --smoke: the trainer's step and the diffusers-script step in one call, on CPU."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(script: str):
    """A bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", REPO_ROOT / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench():
    return _load("train")


def test_smoke_bench_prints_our_step_without_the_peer(tmp_path, capsys, monkeypatch):
    """Without the peer's file (a bare clone), our own step still benchmarks."""
    monkeypatch.setenv("OUT", str(tmp_path))
    code = _bench().main(["--smoke", "--no-peer", "--steps", "1", "--warm", "0",
                          "--variants", "animelora_plain"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["animelora_plain"]
    assert rows[0]["img_per_s"] > 0 and rows[0]["loss"] == rows[0]["loss"]  # not NaN


def test_smoke_bench_prints_both_steps(tmp_path, capsys, monkeypatch):
    bench = _bench()
    if bench.find_peer(None) is None:
        pytest.skip("no peer_baselines.py (set ANIMELORA_PEER_BASELINES)")
    monkeypatch.setenv("OUT", str(tmp_path))
    code = bench.main(["--smoke", "--steps", "1", "--warm", "0",
                       "--variants", "animelora_bf16_gc,diffusers_script_fp16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "variant" in out and "images/s" in out and "peak GiB" in out
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["animelora_bf16_gc", "diffusers_script_fp16"]
    ours = rows[0]
    assert ours["batch"] == 4 and ours["img_per_s"] > 0 and ours["loss"] == ours["loss"]  # not NaN


def test_missing_peer_is_a_clear_error(tmp_path, capsys):
    assert _bench().main(["--smoke", "--peer", str(tmp_path / "nope.py")]) == 2
    assert "peer_baselines.py not found" in capsys.readouterr().err


def test_host_threads_bench_prints_both_settings_side_by_side():
    """bench/host_threads.py starts the processes side by side and prints its table."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "host_threads.py"), "--batch", "2",
                          "--seconds", "0.3", "--processes", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("torch default threads" in line and line.split()[-4] == "2" for line in lines), out.stdout
    trainer = [line for line in lines if line.startswith("trainer on a GPU")]
    assert [line.split()[-5] for line in trainer] == ["1", "1"]  # one thread, alone and side by side


def test_first_calls_bench_times_first_and_second_calls(tmp_path, capsys, monkeypatch):
    """bench/first_calls.py --smoke: a row per kernel and shape with its first and second call,
    and a summary of what the first calls cost more, into $OUT too."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert _load("first_calls").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| sdpa-math | 8x12/1 q96 k96 d40 |" in out and "| conv3x3 | 8x8/4 c1280 |" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary["first_minus_second_s"]) == {"sdpa-math", "conv3x3"}
    assert "driver_cache_mib_after" in summary
    saved = json.loads((tmp_path / "bench_first_calls.jsonl").read_text().splitlines()[0])
    assert len(saved["rows"]) == 2 * 3 * 2 + 2 * 3  # 2 latents x 3 levels x (self, cross) + convs


def test_sample_files_bench_prints_each_set_with_and_without_kept_copies(capsys):
    assert _load("sample_files").main(["--sets", "2", "--images", "4", "--side", "64"]) == 0
    out = capsys.readouterr().out
    assert "| set | write PNGs s | overview, copies kept s | overview, all shrunk anew s |" in out
    assert "| 2 | " in out and "| all | " in out and "zlib level 6" in out


def test_load_model_bench_times_both_ways(capsys):
    assert _load("load_model").main(["--smoke", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "stored {'unet': 'float32'" in out  # the tiny model's files are fp32
    assert "| widened to fp32 (before) |" in out and "| as stored (now) |" in out


def test_blocks_bench_compares_compiled_blocks_with_eager(tmp_path, monkeypatch, capsys):
    """bench/blocks.py --smoke: both 64x64-level blocks, eager first, each compiled setting's
    outputs checked against eager, FLOPs counted, the table and JSON written."""
    blocks = _load("blocks")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert blocks.main(["--smoke", "--settings", "default", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "bench_blocks.json").read_text())["rows"]
    assert [(r["setting"], r["block"]) for r in rows] == [
        ("eager", "down_blocks.0"), ("eager", "up_blocks.-1"),
        ("default", "down_blocks.0"), ("default", "up_blocks.-1")]
    assert all(r["gflop"] > 0 and r["ms"] > 0 for r in rows)
    assert all(r["matches_eager"] for r in rows if r["setting"] == "default")
    assert "TFLOP/s" in out and out.count(" ok") == 2


def test_blocks_bench_rejects_unknown_setting(capsys):
    blocks = _load("blocks")
    with pytest.raises(SystemExit):
        blocks.main(["--smoke", "--settings", "turbo"])
    assert "unknown setting(s) turbo" in capsys.readouterr().err


def test_profile_summary_groups_kernels_by_category():
    """bench/profile_step.py and bench/blocks.py --profile share one kernel summary."""
    profile_step = _load("profile_step")
    kernels = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop": 5.0, "nvjet_sm90_tst_160x128": 2.0,
               "triton_poi_fused_gelu_mul": 1.0, "triton_red_fused_native_layer_norm": 0.5,
               "sm90_xmma_dgrad_implicit_gemm_bf16": 3.0}
    cats, top = profile_step.summarize(kernels, top=2)
    assert cats == {"attention": 5.0, "convolution": 3.0, "matmul": 2.0, "triton (fused)": 1.5}
    assert list(cats) == ["attention", "convolution", "matmul", "triton (fused)"]  # largest first
    assert top == [("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 5.0),
                   ("sm90_xmma_dgrad_implicit_gemm_bf16", 3.0)]


def test_e2e_smoke_runs_the_whole_command_and_reads_its_segment_record(tmp_path, capsys, monkeypatch):
    """bench/e2e.py --smoke: a Danbooru-shaped data set (several aspect buckets), the whole
    `animelora train` command, and a row built from the run's own `segments` record."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    code = _load("e2e").main(["--smoke", "--variants", "default,nosamples@1", "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "out" / "bench_e2e_danbooru.json").read_text())
    assert len(result["buckets"]) >= 3  # portrait, landscape and square images: several buckets
    # the same held-out images on every machine (a fixed salt), so rows of two calls compare
    assert json.loads((tmp_path / "w" / "data-danbooru" / "split.json").read_text())["salt"] == "animelora-bench"
    row, nosamples = result["rows"]
    assert row["rc"] == 0 and row["steps"] == result["total_steps"]
    # the training log's segment record: set-up, then the first step, then the steady rate
    assert 0 < row["setup_s"] <= row["first_step_s"] <= row["wall_s"]
    assert row["img_per_s"] > 0
    # where the rest went: the steps' own time and the validations (step 0 and two epoch ends)
    assert 0 < row["steps_s"] < row["wall_s"] and row["validations"] == 3 and row["validation_s"] > 0
    assert len(row["validation_each_s"]) == 3 and sum(row["validation_each_s"]) == pytest.approx(row["validation_s"], abs=0.01)
    # the default's samples while training (step 0 and both epoch ends): what `nosamples` leaves out
    assert row["sample_sets"] == 3 and row["samples_s"] > 0
    assert nosamples["rc"] == 0 and nosamples["epochs"] == 1 and nosamples["sample_sets"] is None
    assert "| default | 2 |" in out and "| nosamples | 1 |" in out  # the table
    # each variant started with empty caches of its own, as on a new machine
    assert (tmp_path / "w" / "cache-default" / "train").is_dir()
    assert (tmp_path / "w" / "cache-nosamples" / "train").is_dir()
    # where the set-up went, part by part (the segment record's setup_parts), and its table
    parts = row["setup_parts"]
    assert {"load_model", "latent_cache", "unet_lora", "optimizer_runner"} <= set(parts)
    assert 0 < sum(parts.values()) <= row["setup_s"] - row["before_segment_s"] + 0.15  # rows round to 0.1 s
    assert "before the first step:" in out and "| latent_cache s |" in out


def test_e2e_nosamples_variant_runs_the_default_without_samples():
    """`default` against `nosamples` on one GPU is what the default samples while training cost."""
    e2e = _load("e2e")
    assert e2e.variant_args("nosamples") == ["--set", "samples=off"]
    assert e2e.variant_args("fp16+nosamples") == ["--set", "mixed_precision=fp16", "--set", "samples=off"]
    # a part that is no setting sets the process's environment instead
    assert e2e.variant_args("default+expandable") == []
    assert e2e.variant_env("default+expandable_warm") == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert e2e.variant_env("nosamples") == {}


def _kohya():
    """bench/peers/kohya.py, as bench/e2e.py imports it (the repository root on the path)."""
    return _load("e2e").kohya


def test_peer_progress_lines_give_steps_only_for_the_named_bar():
    """The diffusers script's bar is 'Steps:', kohya's 'steps:'; the latent cache's bar, kohya's
    'epoch 1/20' and log lines give no step count."""
    e2e = _load("e2e")
    kohya_line = "steps:  10%|#         | 60/600 [00:31<04:41,  1.91it/s, avr_loss=0.0993]"
    assert e2e.progress_step(kohya_line, "steps:") == 60
    assert e2e.progress_step("Steps:  50%|#####     | 300/600 [01:00<01:00, 5.0it/s, lr=5e-05]", "Steps:") == 300
    assert e2e.progress_step(kohya_line, "Steps:") is None
    assert e2e.progress_step("100%|##########| 650/650 [00:21<00:00, 30.1it/s]", "steps:") is None
    assert e2e.progress_step("epoch 1/20", "steps:") is None
    assert e2e.progress_step("  total optimization steps / 学習ステップ数: 600", "steps:") is None


def test_peer_projection_is_startup_plus_steady_rate_plus_the_tail():
    e2e = _load("e2e")
    # first step at 30 s, then 2 steps/s; 100-step run ends at 79.5 s, the process at 85 s
    marks = [(29.0, 0), (30.0, 1)] + [(30.0 + (n - 1) / 2, n) for n in range(2, 101)]
    row = e2e.project(marks, steps=100, full_steps=1000, wall=85.0)
    assert row["first_step_s"] == 30.0 and row["img_per_s"] == 8.0  # batch 4
    assert row["projected_wall_s"] == round(30.0 + 1000 / 2 + (85.0 - 79.5), 1)
    assert "1000 steps at 2.00 steps/s" in row["note"]
    assert e2e.project(marks[:2], steps=100, full_steps=1000, wall=85.0) is None  # too few to give a rate


def test_a_peer_process_is_timed_from_its_progress_bar(tmp_path, monkeypatch):
    """time_peer runs a real process that draws a tqdm-style bar with carriage returns (as kohya's
    does, off a terminal) and projects its full run from what the bar showed."""
    import sys

    monkeypatch.setenv("OUT", str(tmp_path))
    bar = ("import sys, time\n"
           "print('caching latents'); sys.stdout.write('100%|##| 8/8 [00:00<00:00]\\n')\n"
           "for n in range(0, 21):\n"
           "    sys.stdout.write(f'\\rsteps: {n * 5}%|#| {n}/20 [00:00<00:00, avr_loss=0.1]'); sys.stdout.flush()\n"
           "    time.sleep(0.02)\n"
           "print('\\nmodel saved.')\n")
    row = _load("e2e").time_peer("fake peer", [sys.executable, "-c", bar], "steps:", {}, tmp_path, 20, 200)
    assert row["rc"] == 0 and row["steps_run"] == 20 and "error" not in row, row
    assert 0 < row["first_step_s"] < row["wall_run_s"] < row["projected_wall_s"]
    assert "200 steps at" in row["note"]
    kept = (tmp_path / "bench_e2e_output.log").read_text()
    assert "model saved." in kept  # the tail kept for a failed row
    # each kept line with the second it came at: where a peer's start-up went
    assert re.search(r"^\s*\d+\.\d s  caching latents$", kept, re.M), kept


def test_a_failed_peer_is_a_row_with_its_last_lines(tmp_path):
    import sys

    row = _load("e2e").time_peer("fake peer", [sys.executable, "-c", "raise SystemExit('no cv2 here')"], "steps:",
                                 {}, tmp_path, 20, 200)
    assert row["rc"] == 1 and "no cv2 here" in row["error"] and "projected_wall_s" not in row


def test_kohya_command_has_its_recommended_settings_at_our_hyperparameters(tmp_path):
    kohya = _kohya()
    cmd = kohya.command("python3", tmp_path / "sd", tmp_path / "m", tmp_path / "d", tmp_path / "o", tmp_path / "t", 600)
    assert cmd[:3] == ["python3", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--mixed_precision") + 1] == "fp16"
    assert str(tmp_path / "sd" / "train_network.py") in cmd
    args = dict(zip(cmd, cmd[1:]))
    assert {k: args[k] for k in ("--network_module", "--network_dim", "--network_alpha", "--learning_rate",
                                 "--train_batch_size", "--resolution", "--max_train_steps", "--optimizer_type",
                                 "--save_model_as", "--caption_extension", "--tokenizer_cache_dir")} == {
        "--network_module": "networks.lora", "--network_dim": "16", "--network_alpha": "64",
        "--learning_rate": "5e-5", "--train_batch_size": "4", "--resolution": "512", "--max_train_steps": "600",
        "--optimizer_type": "AdamW", "--save_model_as": "safetensors", "--caption_extension": ".txt",
        "--tokenizer_cache_dir": str(tmp_path / "t")}
    for flag in ("--enable_bucket", "--cache_latents", "--sdpa", "--network_train_unet_only",
                 "--persistent_data_loader_workers"):
        assert flag in cmd
    env = kohya.environment(tmp_path / "site", {"PYTHONPATH": "/tmp/site", "PATH": "/bin"})
    assert env["PYTHONPATH"] == str(tmp_path / "site") and env["PATH"] == "/bin"  # ours stays off its path
    assert env["HF_HUB_OFFLINE"] == "1"


def test_kohya_export_takes_every_local_module_its_imports_reach():
    """The closure follows module-level, deferred and relative imports into library/ and the
    package __init__ on the way; packages and unreached modules stay out."""
    files = {
        "train_network.py": "import torch\nfrom library import train_util\nimport library.utils as u\n",
        "networks/lora.py": "from library.utils import setup_logging\n",
        "library/__init__.py": "",
        "library/train_util.py": "from .model_util import x\ndef f():\n    from library import sdxl_util\n",
        "library/model_util.py": "import numpy\n",
        "library/sdxl_util.py": "",
        "library/utils.py": "",
        "library/flux_only.py": "",
    }
    closure = _kohya().import_closure(files.get)
    assert closure == sorted(set(files) - {"library/flux_only.py"})
    with pytest.raises(FileNotFoundError):
        _kohya().import_closure(files.get, ["train_db.py"])


def test_kohya_sees_the_bench_images_and_model_weights(tmp_path):
    """kohya's <repeats>_<name> folder holds each image with its caption; the model view adds the
    model_index.json kohya's loader needs and the text encoder's keys with the `text_model.`
    prefix transformers 4 reads, and a tokenizer cache under the id kohya asks for."""
    from safetensors.torch import load_file

    from lora.model import ensure_tiny_model

    kohya = _kohya()
    model = ensure_tiny_model()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(b"png")
        (images / f"{i}.txt").write_text(f"1girl, tag{i}")
    root = kohya.data_layout(sorted(images.glob("*.png")), tmp_path)
    assert sorted(p.name for p in (root / "1_bench").iterdir()) == ["0.png", "0.txt", "1.png", "1.txt"]
    assert (root / "1_bench" / "1.txt").read_text() == "1girl, tag1"

    view = kohya.model_view(model, tmp_path)
    index = json.loads((view / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (view / "unet" / "config.json").is_file() and (view / "vae" / "config.json").is_file()
    ours = load_file(model / "text_encoder" / "model.safetensors")
    theirs = load_file(view / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in theirs) and len(theirs) == len(ours)
    for key, value in ours.items():
        assert theirs[key if key.startswith("text_model.") else f"text_model.{key}"].equal(value)
    tokenizer = kohya.tokenizer_cache(model, tmp_path) / "openai_clip-vit-large-patch14"
    assert (tokenizer / "vocab.json").is_file()


def test_e2e_table_compares_each_row_with_both_peers():
    e2e = _load("e2e")
    peers = {"script": {"variant": "diffusers script (fp16)", "projected_wall_s": 450.0, "steps_run": 600},
             "kohya": {"variant": "kohya train_network (fp16)", "projected_wall_s": 300.0, "steps_run": 600}}
    rows = [{"variant": "default", "epochs": 20, "wall_s": 150.0, "steps": 3040},
            {"variant": "default@2", "epochs": 2, "wall_s": 40.0, "steps": 304}]
    out = e2e.table(rows, peers, 3040)
    lines = out.splitlines()
    assert lines[0].endswith("| x script | x kohya |")
    assert lines[3].startswith("| kohya train_network (fp16) |") and lines[3].endswith("| 1.50 | 1.00 |")
    assert lines[4].startswith("| default |") and lines[4].endswith("| 3.00 | 2.00 |")
    assert lines[5].endswith("| - | - |")  # a shorter run is not compared with the full run's projection
    assert "x kohya" not in e2e.table(rows, {"script": peers["script"], "kohya": None}, 3040)


def test_e2e_shorter_row_is_projected_to_the_whole_run_and_compared_by_that():
    """A 5-epoch row of a 20-epoch plan (figures of the twelfth session's fresh H100 row):
    the steps it did not run at its time per step, 15 more validations at its median later
    one, no more sample sets (5 drawn: step 0 and 4 spread over the epochs)."""
    e2e = _load("e2e")
    row = {"variant": "default", "epochs": 5, "wall_s": 95.9, "steps": 740, "steps_s": 33.9,
           "validations": 6, "validation_each_s": [6.913, 1.068, 1.067, 1.07, 1.074, 1.069],
           "samples_s": 13.846, "sample_sets": 5}
    projected = e2e.project_full(row, 2960, 20)
    assert projected == pytest.approx(95.9 + 2220 * 33.9 / 739 + 15 * 1.069, abs=0.1)
    # a 3-epoch row drew 4 sets: the fifth is added at its mean set time
    short = {**row, "epochs": 3, "steps": 444, "validations": 4, "sample_sets": 4, "samples_s": 10.877}
    assert e2e.project_full(short, 2960, 20) == pytest.approx(
        95.9 + 2516 * 33.9 / 443 + 17 * 1.069 + 10.877 / 4, abs=0.1)
    assert e2e.project_full({**row, "steps": 2960}, 2960, 20) is None  # a whole run is measured, not projected
    assert e2e.project_full({**row, "error": "boom"}, 2960, 20) is None
    out = e2e.table([row], {"script": {"variant": "script", "projected_wall_s": 443.1, "steps_run": 100},
                            "kohya": None}, 2960, 20)
    line = out.splitlines()[-1]
    assert f"95.9 (~{projected} for 20 epochs, projected)" in line
    assert line.endswith(f"| {443.1 / projected:.2f} |") and "| 35 |" in line  # steps: 35% of this row's wall


def test_e2e_missing_peer_is_one_line_before_any_setup(tmp_path, capsys):
    assert _load("e2e").main(["--kohya", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no train_network.py" in err
    assert not (tmp_path / "w").exists()


def test_sweep_bench_prints_each_candidate_and_the_whole_runs_it_saved(tmp_path, capsys, monkeypatch):
    """bench/sweep.py --smoke: one real `animelora sweep` (tiny model, 2 candidates, a rung at
    epoch 1), then per candidate its steps and times and the sum of the whole runs."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert _load("sweep").main(["--smoke", "--work", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "| lr0.001 |" in out and "| lr1e-09 |" in out and "every candidate trained whole" in out
    result = json.loads((tmp_path / "bench_sweep.json").read_text())
    assert {r["candidate"] for r in result["rows"]} == {"lr0.001", "lr1e-09"}
    for row in result["rows"]:
        assert row["total_steps"] > 0 and row["whole_s"] > 0
        assert row["steps"] == row["total_steps"] or row["status"] == "pruned"
    assert result["summary"]["all_whole_s"] == pytest.approx(sum(r["whole_s"] for r in result["rows"]), abs=0.2)


def test_e2e_memory_table_says_which_work_grew_the_memory_held():
    """On a card each row carries what the allocator held after each kind of work; the table
    puts them side by side (nothing is printed on a CPU, where no row has them)."""
    e2e = _load("e2e")
    rows = [{"variant": "default", "setup_reserved_gib": 2.1, "reserved_gib": 8.57, "allocated_gib": 6.2,
             "reserved_after_gib": {"validation": 3.4, "samples": 4.9, "first_step": 7.6}},
            {"variant": "nosamples", "setup_reserved_gib": 2.1, "reserved_gib": 7.4,
             "reserved_after_gib": {"validation": 3.4, "first_step": 6.1}}]
    lines = e2e.memory_table(rows).splitlines()
    assert lines[0] == ("| variant | set-up peak GiB | after validation GiB | after samples GiB | after first_step GiB "
                        "| run's peak GiB | run's peak in use GiB |")
    assert lines[2] == "| default | 2.1 | 3.4 | 4.9 | 7.6 | 8.57 | 6.2 |"
    assert lines[3] == "| nosamples | 2.1 | 3.4 | - | 6.1 | 7.4 | - |"
    assert e2e.memory_table([{"variant": "cpu"}]) == ""


def test_validation_memory_counts_live_tensors_once_per_storage():
    """bench/validation_memory.py's counter: a view adds nothing, a freed tensor leaves the
    live count, the peak stays; attention counts its output, not a score matrix."""
    import torch
    import torch.nn.functional as F

    bench = _load("validation_memory")
    counter = bench.LiveBytes()
    with counter:
        a = torch.ones(256, device="meta")  # 1 KiB
        b = a * 2  # 1 KiB
        view = b.view(16, 16)
        del a
        c = view + 1  # 1 KiB, while a is gone
    assert counter.peak == 2 * 1024
    assert counter.live == 2 * 1024  # b (through its view) and c
    del b, view, c
    assert counter.live == 0

    q = torch.empty(1, 8, 4096, 40, device="meta", dtype=torch.bfloat16)
    attention = bench.LiveBytes()
    with bench.FusedAttention(), attention:
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    assert attention.peak == q.numel() * 2  # the output alone; scores would be 4096x4096 per head


def test_validation_memory_bench_prints_peak_per_call_size(tmp_path, monkeypatch, capsys):
    """bench/validation_memory.py --smoke: one row per images-a-call and shape; more images a
    call and larger latents hold more."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert _load("validation_memory").main(["--smoke", "--images", "1,4"]) == 0
    assert "| images a call | rows (x timesteps) |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "bench_validation_memory.json").read_text())
    peak = {(r["images"], tuple(r["latent"])): r["peak_bytes"] for r in saved["rows"]}
    assert [r["rows"] for r in saved["rows"]] == [5, 5, 20, 20]
    assert peak[(4, (8, 8))] > peak[(1, (8, 8))] > 0
    assert peak[(4, (12, 8))] > peak[(4, (8, 8))]
