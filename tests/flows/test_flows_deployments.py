"""One source of truth for the deployments: prefect.yaml is generated from the Python
declarations, carries everything they say, and the nightly schedule's time zone is a setting."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments import prefect_yaml
from deployments.common import FLOW_RUN_ENV, TIMEZONE_ENV, WORK_POOL
from deployments.dataset_refresh import nightly_deployment
from deployments.serve import all_deployments

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def default_env(monkeypatch):
    for name in (TIMEZONE_ENV, "ANIMELORA_GPU_SLOTS", "ANIMELORA_GPU_LIMIT"):
        monkeypatch.delenv(name, raising=False)


def test_committed_prefect_yaml_is_generated_from_the_declarations(default_env):
    committed = (REPO_ROOT / "prefect.yaml").read_text(encoding="utf-8")
    assert committed == prefect_yaml.render(), (
        "prefect.yaml is stale: run `python -m deployments.prefect_yaml --write`"
    )


def test_prefect_yaml_carries_every_declared_setting(default_env):
    config = yaml.safe_load(prefect_yaml.render())
    by_name = {d["name"]: d for d in config["deployments"]}
    declared = all_deployments()
    assert set(by_name) == {d.name for d in declared}
    for deployment in declared:
        entry = by_name[deployment.name]
        assert entry["description"] == deployment.description and entry["description"]
        assert entry["tags"] == deployment.tags
        assert entry["parameters"] == deployment.parameters
        assert entry["entrypoint"] == deployment.entrypoint
        assert entry["work_pool"]["name"] == WORK_POOL
        assert entry["work_pool"]["job_variables"]["env"] == FLOW_RUN_ENV
    assert FLOW_RUN_ENV == {"PREFECT_LOGGING_EXTRA_LOGGERS": "lora"}
    for preset in ("phase1.5", "phase2a", "phase2a-l2", "phase2b"):
        assert preset in by_name[preset]["tags"]
    assert by_name["nightly"]["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC"}]
    # `prefect deploy` makes sure the gpu limit exists before it registers anything
    assert config["build"] == [{"tasks.gpu.ensure_gpu_limit_step": {"id": "gpu-limit"}}]


def test_check_mode_says_when_prefect_yaml_is_stale(default_env, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "prefect.yaml"
    stale.write_text("name: animelora\n")
    monkeypatch.setattr(prefect_yaml, "PREFECT_YAML", stale)
    assert prefect_yaml.main(["--check"]) == 1
    assert "--write" in capsys.readouterr().err
    assert prefect_yaml.main(["--write"]) == 0
    assert prefect_yaml.main(["--check"]) == 0
    assert stale.read_text() == prefect_yaml.render()
    assert not list(tmp_path.glob(".*.tmp"))


def test_nightly_timezone_is_a_setting(monkeypatch):
    monkeypatch.delenv(TIMEZONE_ENV, raising=False)
    assert nightly_deployment().schedules[0].schedule.timezone == "UTC"
    monkeypatch.setenv(TIMEZONE_ENV, "Asia/Tokyo")
    schedule = nightly_deployment().schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "Asia/Tokyo")
    assert "timezone: Asia/Tokyo" in prefect_yaml.render()


def test_unknown_timezone_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv(TIMEZONE_ENV, "Mars/Olympus_Mons")
    with pytest.raises(ValueError, match=f"{TIMEZONE_ENV}: unknown time zone 'Mars/Olympus_Mons'"):
        nightly_deployment()
    assert prefect_yaml.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ANIMELORA_TIMEZONE") and "Traceback" not in err


def test_serve_refuses_a_bad_setting_before_serving(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments import serve

    # nothing listens there: a bad setting must stop serve before it talks to the server
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        monkeypatch.setenv(TIMEZONE_ENV, "Nowhere/Land")
        assert serve.main() == 2
        assert "error: ANIMELORA_TIMEZONE: unknown time zone 'Nowhere/Land'" in capsys.readouterr().err
        monkeypatch.delenv(TIMEZONE_ENV)
        monkeypatch.setenv("ANIMELORA_GPU_SLOTS", "two")
        assert serve.main() == 2
        assert "error: ANIMELORA_GPU_SLOTS: expected a whole number" in capsys.readouterr().err


def test_generator_runs_as_a_module(default_env):
    out = subprocess.run([sys.executable, "-m", "deployments.prefect_yaml", "--check"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
