"""`make demo`: the whole phase2a DAG on this machine, with no network and no GPU.

Starts a local Prefect server, the loopback Danbooru-compatible server and `animelora serve`,
then runs `prefect deployment run train-lora/phase2a --watch` with the tiny model and
demo-sized parameters (fetch, dedup, caption, train, analyze, samples, a dry-run publish),
and prints where the results are. Exits non-zero when the run did not complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from lora.datapaths import DatasetPaths
from lora.runpaths import RUNS_DIR, RunPaths
from lora.testing.prefect_server import PrefectServer


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(
        cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(
    url: str,
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    *,
    any_answer: bool = False,
) -> None:
    """Poll ``url`` until it answers 2xx/3xx (or, with ``any_answer``, any non-5xx status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early (code {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:  # it answered (e.g. 403 for urllib's agent)
            if any_answer and exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up at {url} within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--workspace", default="workspace/demo")
    parser.add_argument("--keep-servers", action="store_true",
                        help="leave the Prefect server (UI) running after the run")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--target-size", type=int, default=20)
    parser.add_argument("--prefect-port", type=int, default=4200)
    args = parser.parse_args(argv)

    workspace = Path(args.workspace).resolve()
    logs = workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_name = "demo-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()

    with ExitStack() as stack:
        print("[demo] starting the Prefect server ...", flush=True)
        server = PrefectServer(port=free_port(args.prefect_port), home=workspace / "prefect-home")
        if args.keep_servers:
            server.__enter__()  # left running on purpose
        else:
            stack.enter_context(server)
        env = {**os.environ, **server.env(), "PREFECT_LOGGING_EXTRA_LOGGERS": "lora"}

        booru_port = free_port()
        booru = _start(
            [sys.executable, "-m", "lora.testing.fakebooru", "--port", str(booru_port),
             "--posts", "60", "--seed", "0"], env, logs / "fakebooru.log",
        )
        serve = _start([_bin("animelora"), "serve"], env, logs / "serve.log")
        if not args.keep_servers:
            stack.callback(_stop, booru)
            stack.callback(_stop, serve)
        booru_url = f"http://127.0.0.1:{booru_port}"
        wait_for(f"{booru_url}/posts.json?limit=1", 60, "the Danbooru-compatible server", booru,
                 any_answer=True)
        print(f"[demo] Danbooru-compatible server at {booru_url}", flush=True)
        wait_for(f"{server.api_url}/deployments/name/train-lora/phase2a", 180,
                 "the served deployments", serve)
        print("[demo] deployments served; running train-lora/phase2a ...", flush=True)

        params = {
            "data": {"workspace": str(workspace), "dataset": "demo", "tags": "1girl",
                     "target_size": args.target_size, "booru_url": booru_url, "requests_per_second": 5},
            "training": {"model": "tiny", "run_name": run_name, "max_steps": args.max_steps},
            "results": {"publish_dry_run": True, "repo_id": "demo-user/anime-lora-demo"},
        }
        cmd = [_bin("prefect"), "deployment", "run", "train-lora/phase2a", "--watch",
               "--params", json.dumps(params)]
        rc = subprocess.call(cmd, env=env)

        run = RunPaths(workspace / RUNS_DIR / run_name)
        print(f"\n[demo] finished in {time.monotonic() - started:.0f}s with exit code {rc}")
        print(f"  LoRA files : {run.lora}")
        print(f"  samples    : {run.samples}")
        print(f"  report     : {run.report_md}")
        print(f"  hub staging: {run.hub}")
        print(f"  data set   : {DatasetPaths.of(workspace, 'demo').root}")
        print(f"  Prefect UI : {server.ui_url}" + ("" if args.keep_servers else " (stopped; use --keep-servers)"))
        if rc == 0 and not run.lora_files():
            print("[demo] the run reported success but wrote no LoRA file", file=sys.stderr)
            rc = 1
        return rc


if __name__ == "__main__":
    sys.exit(main())
