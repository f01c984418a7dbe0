"""The Colab notebook (notebooks/animelora_colab.ipynb), executed as plain Python on CPU.

Each "session" runs every code cell in order in one namespace, as Colab's *Run all* does,
except the cells tagged ``colab-only`` (pip install, Drive mount), with the parameters
overridden for a CPU: the tiny model, a workspace in tmp_path standing in for Drive, and
the loopback Danbooru. The first session is one whose clock says it is near its end, so
training stops on its time budget with a checkpoint; the second is a fresh session that
resumes the run, finishes it, analyzes, samples and publishes as a dry run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import nbformat
import pytest

from lora.testing.fakebooru import FakeDanbooru, generate_posts

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "animelora_colab.ipynb"
COLAB_ONLY = "colab-only"
SESSION_HOURS = 12
LOGIN, API_KEY = "colab-user", "danbooru-key-never-shown-4f1c"


def code_cells() -> list[Any]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def run_session(params: dict[str, Any], before_train: Callable[[], None] | None = None) -> dict[str, Any]:
    """One session: the code cells in order in one namespace, the parameters cell's values
    replaced by ``params``, the ``colab-only`` cells skipped (listed in ``_skipped``)."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    skipped = []
    for cell in code_cells():
        tags = cell.metadata.get("tags", [])
        if COLAB_ONLY in tags:
            skipped.append(cell.id)
            continue
        if cell.id == "train" and before_train is not None:
            before_train()
        exec(compile(cell.source, f"<notebook cell {cell.id}>", "exec"), ns)  # noqa: S102 - the notebook under test
        if "parameters" in tags:
            unknown = set(params) - set(ns)
            assert not unknown, f"not parameters of the notebook: {unknown}"
            ns.update(params)
    ns["_skipped"] = skipped
    return ns


def session_near_its_end(clock: Path, seconds_left: float, margin_minutes: float) -> Callable[[], None]:
    """Set the session clock so that ``seconds_left`` remain before the safety margin: the
    session "started" almost SESSION_HOURS ago."""

    def write() -> None:
        started = time.time() - (SESSION_HOURS * 3600 - margin_minutes * 60 - seconds_left)
        clock.write_text(f"{started}\n")

    return write


def training_log(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "training_log.json").read_text())


@pytest.fixture()
def booru():
    with FakeDanbooru(generate_posts(30, seed=7, traps=False), credentials={LOGIN: API_KEY}) as server:
        yield server


@pytest.fixture()
def colab_env(monkeypatch):
    """The secrets as the notebook finds them in the environment: a Danbooru account, no Hub token."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("DANBOORU_LOGIN", LOGIN)
    monkeypatch.setenv("DANBOORU_API_KEY", API_KEY)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # unset while the test runs, and unset again after it (the notebook sets it in this process)
    monkeypatch.setenv("CUDA_CACHE_PATH", "-")
    monkeypatch.delenv("CUDA_CACHE_PATH")


def test_only_install_and_drive_mount_are_colab_only():
    tagged = [cell.id for cell in code_cells() if COLAB_ONLY in cell.metadata.get("tags", [])]
    assert tagged == ["install", "mount-drive"]
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in nb.cells if cell.cell_type == "code")


def test_a_run_stopped_by_the_session_clock_resumes_next_session_and_is_published_as_a_dry_run(
        tmp_path, booru, colab_env, capsys):
    drive = tmp_path / "drive" / "animelora"
    margin = 0.05  # minutes
    params = dict(TAGS="1girl", TARGET_SIZE=12, DATASET="colab", MODEL="tiny", WORKSPACE=str(drive),
                  BOORU_URL=booru.url, SAFETY_MARGIN_MINUTES=margin, HF_REPO_ID="you/colab-lora",
                  EXTRA_FETCH_ARGS=["--requests-per-second", "10"], EXTRA_SAMPLE_ARGS=["--seeds", "0"])

    # Session 1, near its end. How long a tiny run takes to load and to step depends on the
    # machine and its load: a session too short to reach the first step is followed by a
    # longer one (the run has no step yet: nothing to resume), a session long enough to
    # finish the run by a shorter one with a longer run, until a session stops mid-run.
    seconds_left, epochs = 12.0, 2
    for attempt in range(8):
        clock = tmp_path / f"vm{attempt}" / "session-start"
        params.update(SESSION_CLOCK=str(clock), RUN_NAME=f"colab-run-{epochs}",
                      EXTRA_TRAIN_ARGS=["--epochs", str(epochs)])
        run_dir = drive / "runs" / params["RUN_NAME"]
        ns = run_session(params, before_train=session_near_its_end(clock, seconds_left, margin))
        out = capsys.readouterr().out
        assert ns["_skipped"] == ["install", "mount-drive"]
        assert abs(ns["TIME_BUDGET_MINUTES"] - seconds_left / 60) < 1 / 60
        log = training_log(run_dir)
        stopped_at, total = log["global_step"], log["total_steps"]
        if 0 < stopped_at < total:
            break
        if stopped_at == 0:
            seconds_left *= 1.5
        else:
            seconds_left, epochs = seconds_left * 0.8, epochs * 4
    else:
        pytest.fail(f"no short session stopped mid-run (the last had {seconds_left:.0f} s, {epochs} epochs)")
    assert ns["TRAINING_COMPLETE"] is False
    assert f"stopped at step {stopped_at}/{total} (time-budget)" in out
    assert "training resumes from it" in out
    assert f"--time-budget-minutes {ns['TIME_BUDGET_MINUTES']:.4f}" in out
    assert (drive / "reports" / f"{run_dir.name}-analysis.txt").is_file()  # progress so far
    assert not (run_dir / "samples").exists() and not (run_dir / "hub").exists()

    # Session 2: a new VM, a new clock, the same cells; the run resumes where it stopped.
    params["SESSION_CLOCK"] = str(tmp_path / "vm-next" / "session-start")
    params["SAFETY_MARGIN_MINUTES"] = 20
    before = time.time()
    ns = run_session(params)
    out = capsys.readouterr().out
    assert float(Path(params["SESSION_CLOCK"]).read_text()) >= before  # the clock started afresh
    assert SESSION_HOURS * 60 - 20 - 2 < ns["TIME_BUDGET_MINUTES"] <= SESSION_HOURS * 60 - 20
    assert ns["TRAINING_COMPLETE"] is True
    # the CUDA driver's compiled code is kept on Drive for the next session's commands
    assert os.environ["CUDA_CACHE_PATH"] == str(drive / "cache" / "cuda")
    assert f"run {run_dir.name} has started on its data-set version: nothing to fetch" in out
    log = training_log(run_dir)
    assert log["complete"] and log["global_step"] == total
    assert [s["step"] for s in log["steps"]] == list(range(1, total + 1))
    trained = [(seg["first_step"], seg["last_step"]) for seg in log["segments"] if seg["last_step"]]
    assert trained[-2:] == [(1, stopped_at), (stopped_at + 1, total)]  # resumed, not restarted

    report = drive / "reports" / f"{run_dir.name}-analysis.txt"
    assert f"{run_dir.name}: " in report.read_text()  # the verdict line
    assert (drive / "reports" / f"{run_dir.name}-loss.png").read_bytes().startswith(b"\x89PNG")
    assert (run_dir / "samples" / "grid.png").is_file() and (run_dir / "samples" / "samples.json").is_file()

    assert ns["PUBLISH_DRY_RUN"] is True
    assert "dry run: nothing sent" in ns["PUBLISH_REPORT"] and "private" in ns["PUBLISH_REPORT"]
    assert (run_dir / "hub" / "README.md").is_file()

    # the Danbooru account was used, and its key shown nowhere
    assert any(r.auth_login == LOGIN for r in booru.requests)
    assert "Danbooru account: yes" in out and API_KEY not in out
    assert not [p for p in drive.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
