"""`lora.testing.prefect_server`: the real server other test folders and `make demo` start.

These need no browser. The running-server checks reuse the session's ``ui_server``; one test
starts the foreground mode (``python -m lora.testing.prefect_server``) to prove that Ctrl-C
stops the whole process group and removes the temporary PREFECT_HOME.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lora.testing.prefect_server import PrefectServer, PrefectServerError, free_port

REPO = Path(__file__).resolve().parent.parent.parent


def _get(url: str, accept: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, resp.read()


def test_ui_server_answers_on_loopback_with_ui_pointing_at_itself(ui_server: PrefectServer) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", ui_server.api_url)
    assert ui_server.env()["PREFECT_API_URL"] == ui_server.api_url
    assert ui_server.env()["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"

    status, body = _get(f"{ui_server.api_url}/health")
    assert (status, json.loads(body)) == (200, True)
    # The UI is served, and it was told to call this server's API (not the default port 4200).
    status, _ = _get(f"{ui_server.ui_url}/v2/runs", accept="text/html")
    assert status == 200
    _, settings = _get(f"{ui_server.ui_url}/ui-settings")
    assert json.loads(settings)["api_url"] == ui_server.api_url


def test_ui_server_refuses_a_port_already_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        server = PrefectServer(port=port)
        started = time.monotonic()
        with pytest.raises(PrefectServerError, match=f"port {port}"):
            server.start()
        assert time.monotonic() - started < 5, "a taken port must fail fast, not wait for a timeout"
        assert not server.home.exists(), "a failed start left its temporary PREFECT_HOME behind"


def test_ui_server_that_never_answers_is_killed_and_cleaned_up() -> None:
    server = PrefectServer(startup_timeout=0.5)
    with pytest.raises(PrefectServerError, match="did not answer .*/api/health within"):
        server.start()
    assert not server.running
    assert _pids_listening_on(server.port) == [], "the half-started server outlived the error"
    assert not server.home.exists()


def test_ui_server_rejects_an_invalid_port() -> None:
    with pytest.raises(ValueError, match="port"):
        PrefectServer(port=70000)


def test_ui_server_foreground_mode_stops_cleanly_on_ctrl_c() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora.testing.prefect_server", "--port", str(port)],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("PREFECT_HOME:"):
                break
        output = "".join(lines)
        assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in output, output
        home = Path(re.search(r"PREFECT_HOME: (\S+)", output).group(1))
        assert (home / "prefect.db").exists()
        assert _get(f"http://127.0.0.1:{port}/api/health")[0] == 200
        server_pids = _pids_listening_on(port)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/api/health")
    assert not home.exists(), "the temporary PREFECT_HOME was left behind"
    for pid in server_pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"server process {pid} survived"


def _pids_listening_on(port: int) -> list[int]:
    """The `prefect server start` processes started for this port (from /proc, Linux only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in cmdline and b"start" in cmdline and str(port).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().split()[2]) == "Z"
    except OSError:
        return True
