"""Log analysis: the guide's figures, verdicts, spikes, validation, comparisons, plots, report."""
from __future__ import annotations

import json

import pytest

from lora.analysis import (
    LogError,
    analyze_log,
    compare_runs,
    load_log,
    plot_comparison,
    plot_loss,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_guide_case_rising_after_epoch_3(guide_log):
    analysis = analyze_log(guide_log)
    data = analysis.to_dict()
    assert data["initial_loss"] == pytest.approx(0.105)
    assert data["min_loss"] == pytest.approx(0.0985) and data["min_epoch"] == 3
    assert data["final_loss"] == pytest.approx(0.1089)
    assert data["improvement_pct"] < 0
    assert round(data["improvement_pct"], 1) == -3.7
    assert data["trend"] == "rising"
    assert "rising after epoch 3" in data["verdict"]
    assert "learning rate too high or overfitting" in data["verdict"]
    assert data["spikes"] == []
    assert data["validation"] is None
    assert data["name"] == "phase1.5_training_log"
    assert len(data["smoothed"]) == 10


def test_run_folder_is_named_after_the_run(tmp_path, guide_log):
    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    (run / "training_log.json").write_bytes(guide_log.read_bytes())
    assert analyze_log(run).name == "my-run"
    assert analyze_log(run / "training_log.json").name == "my-run"
    assert load_log(run)["epochs"] == 10


def test_improving_log(epoch_log):
    analysis = analyze_log(epoch_log([0.20, 0.17, 0.15, 0.14, 0.13, 0.125]))
    assert analysis.training.trend == "improving"
    assert analysis.improvement_pct == pytest.approx(37.5)
    assert analysis.verdict.startswith("improving")
    assert analysis.min_epoch == 6


def test_flat_log_is_a_plateau(epoch_log):
    analysis = analyze_log(epoch_log([0.120, 0.121, 0.119, 0.1205, 0.1195, 0.1198]))
    assert analysis.training.trend == "plateau"
    assert "plateau" in analysis.verdict


def test_improved_overall_but_rising_at_the_end(epoch_log):
    analysis = analyze_log(epoch_log([0.30, 0.20, 0.15, 0.16, 0.17, 0.18, 0.19]))
    assert analysis.improvement_pct > 0
    assert "rising after epoch 3" in analysis.verdict
    assert "improved" in analysis.verdict


def test_spike_at_epoch_4(epoch_log):
    # +31% at epoch 4, as in the guide's noisy run.
    log = epoch_log([0.20, 0.18, 0.17, 0.2227, 0.16, 0.15])
    data = analyze_log(log).to_dict()
    assert [s["epoch"] for s in data["spikes"]] == [4]
    assert data["spikes"][0]["jump_pct"] == pytest.approx(31.0, abs=0.1)
    assert "+31.0% at epoch 4" in data["verdict"]
    assert analyze_log(log, spike_threshold_pct=50).to_dict()["spikes"] == []
    assert [s["epoch"] for s in analyze_log(log, spike_threshold_pct=5).to_dict()["spikes"]] == [4]


def test_validation_metrics_and_per_timestep(epoch_log):
    log = epoch_log(
        [0.20, 0.19, 0.21, 0.20],
        validation=[
            {"step": 10, "epoch": 1, "loss": 0.50, "per_timestep": {"100": 0.30, "500": 0.55}},
            {"step": 20, "epoch": 2, "loss": 0.46, "per_timestep": {"100": 0.28, "500": 0.50}},
            {"step": 30, "epoch": 3, "loss": 0.44, "per_timestep": {"100": 0.27, "500": 0.48}},
            {"step": 40, "epoch": 4, "loss": 0.42, "per_timestep": {"100": 0.26, "500": 0.45}},
        ],
    )
    data = analyze_log(log).to_dict()
    val = data["validation"]
    assert val["initial_loss"] == 0.50 and val["final_loss"] == 0.42
    assert val["min_loss"] == 0.42 and val["min_epoch"] == 4
    assert val["improvement_pct"] == pytest.approx(16.0)
    assert val["per_timestep_final"] == {"100": 0.26, "500": 0.45}
    assert val["per_timestep_initial"] == {"100": 0.30, "500": 0.55}
    assert val["trend"] == "improving"
    assert "Validation loss: improving" in data["verdict"]
    assert [p["step"] for p in val["points"]] == [10, 20, 30, 40]


def test_compare_prefers_validation_loss(epoch_log):
    noisy_but_better = analyze_log(epoch_log(
        [0.2, 0.21, 0.2], validation=[{"epoch": 1, "loss": 0.3}, {"epoch": 3, "loss": 0.2}]),
        name="v2a")
    smooth_but_worse = analyze_log(epoch_log(
        [0.2, 0.15, 0.1], validation=[{"epoch": 1, "loss": 0.3}, {"epoch": 3, "loss": 0.29}]),
        name="v1.5")
    comparison = compare_runs([smooth_but_worse, noisy_but_better])
    assert comparison.best_by_validation == "v2a"
    assert comparison.best_by == "validation"
    assert [r["run"] for r in comparison.rows] == ["v1.5", "v2a"]
    assert "| v2a |" in comparison.to_markdown()


def test_compare_without_validation_uses_improvement_with_a_note(guide_log, epoch_log):
    v15 = analyze_log(guide_log, name="v1.5")
    v2a = analyze_log(epoch_log([0.12, 0.11, 0.105]), name="v2a")
    comparison = compare_runs([v15, v2a])
    assert comparison.best == "v2a" and comparison.best_by == "improvement"
    assert comparison.best_by_validation is None
    assert "noisy" in comparison.note


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "file is empty"),
        ("   \n", "file is empty"),
        ("{\"losses\": [", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{\"epochs\": 3}", "no 'losses'"),
        ("{\"losses\": []}", "'losses' is empty"),
        ("{\"losses\": {\"epoch\": 1}}", "'losses' must be a list"),
        ("{\"losses\": [{\"epoch\": 1}]}", "losses[0] has no 'loss'"),
        ("{\"losses\": [{\"epoch\": 1, \"loss\": \"low\"}]}", "losses[0].loss must be a number"),
        ("{\"losses\": [{\"epoch\": 1.5, \"loss\": 1}]}", "losses[0].epoch must be a whole"),
    ],
)
def test_bad_logs_give_one_line_naming_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "training_log.json"
    path.write_text(content)
    with pytest.raises(LogError) as info:
        analyze_log(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and problem in message


def test_missing_log_and_folder_without_log(tmp_path):
    with pytest.raises(LogError, match="no such file") as info:
        load_log(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    with pytest.raises(LogError, match="no training_log.json in this folder"):
        analyze_log(tmp_path)


def test_repeated_epoch_keeps_the_later_record():
    log = {"losses": [{"epoch": 1, "loss": 0.3}, {"epoch": 2, "loss": 0.9},
                      {"epoch": 2, "loss": 0.25}, {"epoch": 3, "loss": 0.2}]}
    analysis = analyze_log(log)
    assert [r["loss"] for r in analysis.losses] == [0.3, 0.25, 0.2]
    assert analysis.spikes == ()


def test_nan_loss_is_reported_as_divergence(epoch_log):
    data = analyze_log(epoch_log([0.2, 0.19, float("nan"), float("nan")])).to_dict()
    assert data["trend"] == "diverged" and data["diverged_epoch"] == 3
    assert "NaN" in data["verdict"]
    assert data["final_loss"] == 0.19


def test_log_with_only_step_records_is_summarised_per_epoch():
    log = {"epochs": 2, "losses": [],
           "steps": [{"step": s, "epoch": 1 if s <= 2 else 2, "loss": 0.3 - 0.02 * s}
                     for s in range(1, 5)]}
    analysis = analyze_log(log)
    assert analysis.derived_from_steps
    assert [row["epoch"] for row in analysis.losses] == [1, 2]
    assert analysis.initial_loss == pytest.approx(0.27)


def test_plots_are_pngs(tmp_path, guide_log, epoch_log):
    with_val = analyze_log(epoch_log(
        [0.2, 0.15, 0.2, 0.1],
        validation=[{"step": 2, "epoch": 1, "loss": 0.3}, {"step": 3, "epoch": 1, "loss": 0.28},
                    {"step": 8, "epoch": 4, "loss": 0.25}]), name="v2a")
    out = plot_loss(with_val, tmp_path / "plots" / "loss.png")
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 5000
    out2 = plot_loss(guide_log, tmp_path / "guide.png")
    assert out2.read_bytes().startswith(PNG_MAGIC)
    out3 = plot_comparison([guide_log, with_val], tmp_path / "cmp.png")
    assert out3.read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_report(tmp_path, guide_log, epoch_log):
    run = tmp_path / "run"
    run.mkdir()
    analysis = analyze_log(guide_log, name="phase1.5")
    other = analyze_log(epoch_log([0.12, 0.11, 0.105]), name="phase2a")
    report_md = write_report(run, analysis, compare_runs([analysis, other]))
    assert report_md == run / "report" / "report.md"
    text = report_md.read_text()
    assert "rising after epoch 3" in text and "![loss curve](loss_curve.png)" in text
    assert "| phase2a |" in text
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert round(metrics["improvement_pct"], 1) == -3.7
    assert metrics["comparison"]["best"] == "phase2a"
    assert (run / "report" / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (run / "report").iterdir()) == [
        ".animelora.json", "comparison.png", "loss_curve.png", "metrics.json", "report.md"]


def test_metrics_json_is_valid_even_with_nan(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_report(run, analyze_log({"losses": [{"epoch": 1, "loss": float("nan")}]}))
    data = json.loads((run / "report" / "metrics.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["final_loss"] is None and data["trend"] == "diverged"
