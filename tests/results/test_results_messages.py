"""What `analyze` says must be true: the direction of a change, a change that counted never reads
0.0%, and too few held-out images are blamed on their true cause (issue 24)."""
from __future__ import annotations

import json

from animelora.cli import main
from lora.analysis import analyze_log
from lora.analysis.metrics import series_metrics
from lora.analysis.paired import Scores, paired_compare


def _scores(label: str, losses: dict[str, float]) -> Scores:
    return Scores(label, {name: {"100": v, "500": v * 2} for name, v in losses.items()}, base_model="tiny")


def test_plateau_says_which_way_the_loss_moved(epoch_log):
    fell = analyze_log(epoch_log([1.0, 0.995, 0.987])).training
    assert fell.trend == "plateau"
    assert "loss fell 1.3% overall" in fell.verdict and "+1.3" not in fell.verdict
    rose = analyze_log(epoch_log([1.0, 1.005, 1.013])).training
    assert rose.trend == "plateau" and "loss rose 1.3% overall" in rose.verdict


def test_a_small_counted_fall_never_reads_zero():
    metrics = series_metrics([1, 2, 3], [1.0, 0.9998, 0.9996], spike_threshold_pct=30.0,
                             label="validation", noise_pct=0.02, noise_source="measured")
    assert metrics.trend == "improving"
    assert "loss fell 0.04% from" in metrics.verdict and "0.0%" not in metrics.verdict


def test_too_few_images_against_step_0_blames_the_data_set_not_different_images():
    run = _scores("run", {"a.png": 0.5, "b.png": 0.4})
    base = _scores("run base model (step 0)", {"a.png": 0.6, "b.png": 0.45})
    message = paired_compare(run, base).message
    assert "different images" not in message and "--rescore" not in message
    assert "only 2 held-out image(s)" in message and "add images" in message
    assert "26 images or more hold out 3" in message  # the default 10% share, computed


def test_different_images_still_point_to_rescore():
    a = _scores("a", {"x.png": 0.5, "y.png": 0.4, "z.png": 0.3})
    b = _scores("b", {"x.png": 0.6, "v.png": 0.4, "w.png": 0.3})
    message = paired_compare(a, b).message
    assert "validated on different images" in message and "--rescore" in message


def test_analyze_json_vs_base_of_a_small_data_set_says_the_true_cause(tmp_path, epoch_log, capsys):
    per_image = lambda v: {"a.png": [v, v], "b.png": [v + 0.1, v + 0.1]}  # noqa: E731
    log = epoch_log([0.3, 0.28], validation=[
        {"step": 0, "epoch": 0, "loss": 0.5, "timesteps": [100, 500], "per_image": per_image(0.5)},
        {"step": 4, "epoch": 2, "loss": 0.45, "timesteps": [100, 500], "per_image": per_image(0.45)}])
    path = tmp_path / "training_log.json"
    path.write_text(json.dumps(log))
    assert main(["analyze", str(path), "--json"]) == 0
    vs_base = json.loads(capsys.readouterr().out)[0]["vs_base_model"]
    assert vs_base["status"] == "too-few-images"
    assert "add images" in vs_base["message"] and "--rescore" not in vs_base["message"]
