"""The worker way, as a user runs it: a process work pool, `prefect deploy --all` from the
committed prefect.yaml, `prefect worker start`, and two `train-lora` runs at once.

What must hold: `prefect deploy` creates the `gpu` limit, the two trainings take turns on the
GPU (their segments' slot-holding intervals, from the runs' own logs, never overlap), and the
library's `lora` log lines reach the UI (the deployments' job variables set
PREFECT_LOGGING_EXTRA_LOGGERS). Runs against its own `prefect server start`
(lora/testing/prefect_server.py) so a held slot can never leak into other tests.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
from prefect.workers.process import ProcessWorker

from lora.testing.datasets import write_synthetic_dataset
from lora.testing.prefect_server import PrefectServer

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
HOLD = re.compile(r"segment (\d+): holding a '([\w-]+)' slot")
RELEASE = re.compile(r"segment (\d+) stopped at step .*releasing the '([\w-]+)' slot")


def _prefect(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _wait_final(api: httpx.Client, run_ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {rid: api.get(f"/flow_runs/{rid}").json()["state_type"] for rid in run_ids}
        if all(s in FINAL for s in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"flow runs not finished after {timeout:.0f}s: {states}")


def _logs(api: httpx.Client, run_id: str) -> list[dict]:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    return api.post("/logs/filter", json=body).json()


def _slot_intervals(logs: list[dict]) -> list[tuple[datetime, datetime]]:
    """(took the slot, gave it back) per segment, from the segment task's own log lines."""
    held: dict[str, datetime] = {}
    intervals = []
    for line in logs:
        when = datetime.fromisoformat(line["timestamp"])
        if m := HOLD.search(line["message"]):
            held[m.group(1)] = when
        elif (m := RELEASE.search(line["message"])) and m.group(1) in held:
            intervals.append((held.pop(m.group(1)), when))
    return intervals


def test_worker_runs_two_trainings_one_segment_at_a_time(tmp_path):
    from lora.model import ensure_tiny_model

    ensure_tiny_model()  # built once here, not twice at the same time by the two runs
    ws = tmp_path / "ws"
    write_synthetic_dataset(ws / "datasets" / "demo", 12, [(96, 96), (128, 80), (80, 128)])

    with PrefectServer(services=False) as server, \
            httpx.Client(base_url=server.api_url, timeout=30) as api:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "ANIMELORA_GPU_", "ANIMELORA_TIMEZONE",
                                    "ANIMELORA_FAULT_", "ANIMELORA_FAKE_OOM"))}
        env.update(server.env())
        env.update(PYTHONPATH=str(REPO_ROOT), ANIMELORA_HOME=str(REPO_ROOT),
                   PREFECT_WORKER_QUERY_SECONDS="1", OMP_NUM_THREADS="1")

        # what `prefect work-pool create gpu-pool --type process` sends, without its CLI start-up
        template = ProcessWorker.get_default_base_job_template()
        created = api.post("/work_pools/", json={"name": "gpu-pool", "type": "process",
                                                 "base_job_template": template})
        assert created.status_code == 201, created.text
        assert api.get("/v2/concurrency_limits/gpu").status_code == 404
        deployed = _prefect(["deploy", "--all"], env, timeout=300)
        assert "phase2a" in deployed and "nightly" in deployed, deployed
        limit = api.get("/v2/concurrency_limits/gpu")
        assert limit.status_code == 200 and limit.json()["limit"] == 1, limit.text

        worker_log_file = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "gpu-pool", "--name", "test-worker"],
            env=env, cwd=tmp_path, stdout=worker_log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # both at once, as the UI's "Run" button (or `prefect deployment run`) would
            deployment = api.get("/deployments/name/train-lora/phase2a").json()
            run_ids = []
            for name in ("first", "second"):
                params = {"data": {"workspace": str(ws), "dataset": "demo", "target_size": 12},
                          "training": {"model": "tiny", "max_steps": 2, "run_name": name},
                          "results": {"sample": False}}
                created = api.post(f"/deployments/{deployment['id']}/create_flow_run",
                                   json={"parameters": params})
                assert created.status_code == 201, created.text
                run_ids.append(created.json()["id"])
            states = _wait_final(api, run_ids, timeout=420)
            # A run is Completed a moment before its process has sent its last log lines;
            # stopping the worker now would end that process (same process group) first.
            deadline = time.monotonic() + 60
            while True:
                logs = {rid: _logs(api, rid) for rid in run_ids}
                intervals = sorted(i for rid in run_ids for i in _slot_intervals(logs[rid]))
                if len(intervals) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(1)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            worker_log_file.close()
        worker_log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
        assert set(states.values()) == {"COMPLETED"}, f"{states}\n{worker_log}"

        assert len(intervals) == 2, [l["message"] for rid in run_ids for l in logs[rid]]
        (a_start, a_end), (b_start, b_end) = intervals
        assert a_end <= b_start, f"two trainings held the GPU at once: {intervals}"
        for rid in run_ids:
            messages = [l["message"] for l in logs[rid]]
            assert not any("skipping acquisition" in m.lower() for m in messages), messages
            assert any("starting run" in m for m in messages), "the lora logger's lines never reached the API"
        for name in ("first", "second"):
            assert (ws / "runs" / name / "lora" / "pytorch_lora_weights.safetensors").exists()
