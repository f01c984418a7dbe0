"""A sweep's candidates trained in parallel by two worker processes, as runs of the
`sweep-candidate` deployment, under the `gpu` limit: with 1 slot their training segments never
overlap in time, with 2 neither waits for the other's slot. A candidate run that a killed sweep left behind is awaited,
not started a second time.

The two workers are two processes serving the project's own `sweep-candidate` declaration
(deployments/sweep.py) with one flow run at a time each, as two single-GPU hosts would; the
sweep itself runs here. The training times come from the runs' own segment records
(training_log.json), the waits for a slot from the runs' logs on the server. The deployment and the limit get names of their own, so nothing of this test
reaches another test on the shared server.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId, LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment

from flows.sweep import _candidate_parameters, _flow_run_name, sweep, sweep_spec
from lora.runpaths import RunPaths
from lora.sweep import TrainJob
from lora.sweep.state import open_state
from lora.testing.datasets import write_synthetic_dataset
from tasks.gpu import ensure_gpu_limit

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = ("import sys; from prefect import serve; from deployments.sweep import candidate_deployment; "
         "serve(candidate_deployment(sys.argv[1]), limit=1)")
#: every candidate shares these: 2 epochs of 7 steps, compared only at the end (one run each)
BASE = {"epochs": 2, "batch_size": 4, "checkpoint_every_minutes": 60}
GRID = {"learning_rate": [0.03, 0.05]}


def _workspace(root: Path) -> Path:
    dataset = root / "ws" / "datasets" / "demo"
    dataset.mkdir(parents=True)
    (dataset / "split.json").write_text(json.dumps({"salt": "sweep-tests", "fraction": 0.1}))
    write_synthetic_dataset(dataset, 30, [(64, 64)])
    return root / "ws"


def _start_workers(tmp_path: Path, env: dict[str, str], deployment: str) -> list[subprocess.Popen]:
    """Two processes serving the candidate deployment, one flow run at a time each; returns once
    both poll for runs."""
    procs = []
    for i in range(2):
        log = open(tmp_path / f"worker{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-c", SERVE, deployment], env=env, cwd=REPO_ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        texts = [(tmp_path / f"worker{i}.log").read_text(errors="replace") for i in range(2)]
        for proc, text in zip(procs, texts):
            assert proc.poll() is None, text[-3000:]
        if all("being served" in t for t in texts):
            return procs
        time.sleep(0.5)
    raise AssertionError(f"workers not serving after 120 s: {texts}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _segments(run_dirs: list[Path]) -> list[tuple[float, float]]:
    """(start, end) of every training segment of these runs, oldest first."""
    out = []
    for run_dir in run_dirs:
        for seg in RunPaths(run_dir).read_log()["segments"]:
            out.append((seg["started_at"], seg["started_at"] + seg["wall_s"]))
    return sorted(out)


#: tasks/train.py's line when a segment got its slot of the `gpu` limit
SLOT_WAIT = re.compile(r"holding a '[\w-]+' slot after ([\d.]+) s of waiting")


def _slot_waits(runs, timeout_s: float = 60.0) -> dict[str, float]:
    """Seconds each flow run's training waited for its `gpu` slot, from the run's logs on the
    server (a run's process sends its last logs as it exits, so they may come a moment late)."""
    ids = {r.id: r.name for r in runs}
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(ids))))
        waits = {ids[log.flow_run_id]: float(m.group(1)) for log in logs if (m := SLOT_WAIT.search(log.message))}
        if len(waits) == len(ids) or time.monotonic() > deadline:
            assert len(waits) == len(ids), f"no slot line for {set(ids.values()) - set(waits)}"
            return waits
        time.sleep(1)


def _run_sweep(ws: Path, name: str, deployment: str) -> dict:
    state = sweep(workspace=str(ws), dataset="demo", name=name, model="tiny", base=BASE, grid=GRID,
                  rungs=[], parallel=True, candidate_deployment=f"sweep-candidate/{deployment}",
                  return_state=True)
    assert state.is_completed(), state
    return state.result()


@pytest.mark.slow
def test_candidates_train_on_two_workers_within_the_gpu_slots(prefect_api, tmp_path):
    from lora.model import ensure_tiny_model

    ensure_tiny_model()  # built once here, not by two workers at the same time
    ws = _workspace(tmp_path)
    deployment, limit = f"test-{uuid.uuid4().hex[:8]}", f"gpu-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ANIMELORA_GPU_"))}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_EXTRA_LOGGERS="lora",
               ANIMELORA_GPU_LIMIT=limit, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    ensure_gpu_limit(1, limit)
    workers = _start_workers(tmp_path, env, deployment)
    try:
        # a sweep killed right after it submitted its first candidate: that run is still coming
        ws_, spec = sweep_spec(str(ws), "demo", "one", "phase2a", "tiny", BASE, GRID, None, [])
        open_state(ws_, spec)
        first = spec.candidates[0]
        job = TrainJob(first.name, 0, spec.config(first), RunPaths.of(ws_, spec.run_name(first)).root, None)
        run_deployment(f"sweep-candidate/{deployment}", parameters=_candidate_parameters(job, 60.0, 1),
                       flow_run_name=_flow_run_name(job), timeout=0)

        one = _run_sweep(ws, "one", deployment)  # the gpu limit has 1 slot
        ensure_gpu_limit(2, limit)
        two = _run_sweep(ws, "two", deployment)
    finally:
        _stop(workers)
    worker_logs = "\n".join((tmp_path / f"worker{i}.log").read_text(errors="replace")[-2000:] for i in range(2))

    for result in (one, two):
        assert result["status"] == "complete" and result["best"] in ("lr0.03", "lr0.05"), worker_logs
        assert [r["status"] for r in result["ranking"]] == ["complete", "complete"]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"sweep-candidate/{deployment}")
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])))
    # one run per candidate: the one the killed sweep left was awaited, not started again
    assert sorted(r.name for r in runs) == ["one-lr0.03-rung1", "one-lr0.05-rung1",
                                            "two-lr0.03-rung1", "two-lr0.05-rung1"], worker_logs
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]

    serial = _segments([ws / "runs" / f"one-{c}" for c in ("lr0.03", "lr0.05")])
    parallel = _segments([ws / "runs" / f"two-{c}" for c in ("lr0.03", "lr0.05")])
    assert len(serial) == len(parallel) == 2  # one segment per candidate: nothing trained twice
    (a_start, a_end), (b_start, b_end) = serial
    assert a_end <= b_start, f"1 gpu slot, yet two trainings at once: {serial}"
    # Whether two 5-second trainings overlap depends on when each worker picks its run up (a
    # loaded machine once started one after the other had ended); what the slots decide is
    # whether a training waits for the other's slot. Each candidate's task logs its wait.
    waits = {name: w for name, w in _slot_waits(runs).items() if name.startswith("two-")}
    shortest = min(end - start for start, end in parallel)
    assert max(waits.values()) < 0.5 * shortest, \
        f"2 gpu slots, yet a candidate waited for the other's slot: {waits}, trainings {parallel}"
