"""`animelora analyze` through the real CLI entry point."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from animelora.cli import main

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"initial_loss", "min_loss", "min_epoch", "final_loss", "improvement_pct", "spikes",
            "validation", "verdict", "smoothed"}


def _run_dir(root: Path, name: str, log: dict) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "training_log.json").write_text(json.dumps(log))
    return run


def test_json_output_one_object_per_run(tmp_path, guide_log, epoch_log, capsys):
    v2a = _run_dir(tmp_path, "v2a", epoch_log(
        [0.2, 0.18, 0.17, 0.2227, 0.16],
        validation=[{"step": 5, "epoch": 1, "loss": 0.4, "per_timestep": {"300": 0.41}},
                    {"step": 25, "epoch": 5, "loss": 0.35, "per_timestep": {"300": 0.33}}]))
    assert main(["analyze", str(guide_log), str(v2a), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and len(data) == 2
    for item in data:
        assert REQUIRED <= set(item)
    guide, run = data
    assert round(guide["improvement_pct"], 1) == -3.7 and guide["min_epoch"] == 3
    assert guide["validation"] is None
    assert run["name"] == "v2a"
    assert run["spikes"] == [{"epoch": 4, "jump_pct": pytest.approx(31.0, abs=0.1)}]
    assert run["validation"]["final_loss"] == 0.35
    assert run["validation"]["per_timestep_final"] == {"300": 0.33}


def test_table_output_and_plot(tmp_path, guide_log, epoch_log, capsys):
    v2a = _run_dir(tmp_path, "v2a", epoch_log([0.12, 0.11, 0.105]))
    plot = tmp_path / "cmp.png"
    assert main(["analyze", str(guide_log), str(v2a), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "improvement %" in out and "-3.7" in out and "+12.5" in out
    assert "rising after epoch 3" in out
    assert "best: v2a" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("content, problem, code", [
    (None, "no such file", 2), ("", "file is empty", 1), ("{oops", "not valid JSON", 1)])
def test_bad_log_is_one_line(tmp_path, guide_log, content, problem, code, capsys):
    """A path that is not there is a usage error (2); a log that cannot be read, a failure (1)."""
    path = tmp_path / "training_log.json"
    if content is not None:
        path.write_text(content)
    assert main(["analyze", str(guide_log), str(path)]) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(path) in lines[0] and problem in lines[0]
    assert captured.out == ""


def test_usage_errors_exit_2(guide_log, capsys):
    assert main(["analyze", str(guide_log), "--spike-threshold", "0"]) == 2
    assert "spike-threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["analyze"])
    assert info.value.code == 2


def test_module_entry_point(guide_log):
    proc = subprocess.run([sys.executable, "-m", "animelora", "analyze", str(guide_log), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["min_epoch"] == 3
