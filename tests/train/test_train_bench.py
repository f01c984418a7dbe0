"""bench/train.py --smoke: the trainer's step and the diffusers-script step in one call, on CPU."""
from __future__ import annotations

import importlib.util
import json
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
    code = _load("e2e").main(["--smoke", "--variants", "default", "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "out" / "bench_e2e_danbooru.json").read_text())
    assert len(result["buckets"]) >= 3  # portrait, landscape and square images: several buckets
    (row,) = result["rows"]
    assert row["rc"] == 0 and row["steps"] == result["total_steps"]
    # the training log's segment record: set-up, then the first step, then the steady rate
    assert 0 < row["setup_s"] <= row["first_step_s"] <= row["wall_s"]
    assert row["img_per_s"] > 0
    # where the rest went: the steps' own time and the validations (step 0 and two epoch ends)
    assert 0 < row["steps_s"] < row["wall_s"] and row["validations"] == 3 and row["validation_s"] > 0
    assert "| default | 2 |" in out  # the table
