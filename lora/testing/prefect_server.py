"""A real `prefect server start` on a free loopback port, with its own PREFECT_HOME and SQLite.

Why a subprocess and not ``prefect_test_harness``: the browser test and ``make demo`` need the
server *exactly* as a user runs it (UI included, served on the port the UI is told to call),
and subprocesses started by tests (``prefect deployment run``, ``animelora serve``) must be
able to reach it. This module never imports Prefect (``lora/`` is Prefect-free): it runs the
``prefect`` CLI that sits next to ``sys.executable``.

Usage::

    with PrefectServer() as server:
        env = {**os.environ, **server.env()}
        subprocess.run([...], env=env)
        print(server.ui_url)

or in the foreground, until Ctrl-C::

    python -m lora.testing.prefect_server --port 4200
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from lora.fsutil import atomic_write

__all__ = ["PrefectServer", "PrefectServerError", "free_port", "prefect_command", "main"]

#: Host every URL uses; a server on loopback only is never reachable from outside.
HOST = "127.0.0.1"


class PrefectServerError(RuntimeError):
    """The server could not be started (the message carries the tail of its log)."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is retried by start())."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def prefect_command() -> list[str]:
    """The `prefect` CLI of this interpreter's environment (next to sys.executable, else PATH)."""
    beside = Path(sys.executable).with_name("prefect")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("prefect")
    if found:
        return [found]
    # Prefect ships a __main__, so this works wherever the package is importable.
    return [sys.executable, "-m", "prefect"]


def template_cache_dir() -> Path:
    """Where migrated empty databases are kept: ``$ANIMELORA_CACHE`` or ``~/.cache/animelora``."""
    root = os.environ.get("ANIMELORA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "animelora"


def _template_path() -> Path | None:
    try:
        version = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        return None
    return template_cache_dir() / "prefect-db" / f"prefect-{version}.db"


def _port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class PrefectServer:
    """A `prefect server start` subprocess on loopback; a context manager.

    Args:
        port: the port to listen on; ``None`` picks a free one (and retries with another if
            it is taken between picking and binding).
        home: PREFECT_HOME (the SQLite database ``prefect.db``, the UI build, the server log
            ``server.log``). ``None`` uses a temporary folder that is removed on stop; a given
            folder is kept, so a later server over the same home starts faster and keeps runs.
        startup_timeout: seconds to wait for ``/api/health`` (a new database takes ~18 s on
            2 CPU cores, a reused one ~5 s).
        services: run the scheduler and other services (schedules need them); ``False``
            serves only the API and UI.
        db_template: migrating a new SQLite database is most of a first start (~10 of ~15 s
            on 2 cores). With this on, a home without ``prefect.db`` is seeded from a copy
            of a freshly migrated database kept per Prefect version under
            ``template_cache_dir()`` (snapshotted, with SQLite's backup API, right after the
            first server that had to migrate answered), so later starts take ~5 s.
    """

    def __init__(
        self,
        port: int | None = None,
        home: Path | str | None = None,
        *,
        startup_timeout: float = 120.0,
        services: bool = True,
        db_template: bool = True,
    ) -> None:
        if port is not None and not (0 < int(port) < 65536):
            raise ValueError(f"port: {port!r} is not a TCP port (1-65535)")
        self._fixed_port = port is not None
        self.port: int = int(port) if port is not None else free_port()
        self._own_home = home is None
        self.home: Path = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="prefect-home-"))
        self.startup_timeout = float(startup_timeout)
        self.services = services
        self.db_template = db_template
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self.startup_seconds: float | None = None

    # ----------------------------------------------------------------- URLs and environment
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        """What clients put in PREFECT_API_URL."""
        return f"{self.url}/api"

    @property
    def ui_url(self) -> str:
        """The UI's root (the V2 UI lives under ``/v2/``)."""
        return self.url

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    @property
    def db_path(self) -> Path:
        return self.home / "prefect.db"

    def env(self) -> dict[str, str]:
        """The variables a client subprocess needs to talk to this server (and only to it).

        Merge them over the caller's environment: ``{**os.environ, **server.env()}``. The
        client shares PREFECT_HOME with the server so nothing touches the user's ~/.prefect.
        """
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }

    def server_env(self) -> dict[str, str]:
        """The full environment of the server process itself.

        Every inherited ``PREFECT_*`` variable is dropped first: a user's profile settings
        (another API URL, a PostgreSQL URL, a cloud key) must not leak into a throwaway server.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(self.env())
        env.update(
            {
                "PREFECT_SERVER_API_HOST": HOST,
                "PREFECT_SERVER_API_PORT": str(self.port),
                # The UI calls this from the browser; without it the UI calls port 4200 and
                # shows "Unable to connect" when the server listens elsewhere.
                "PREFECT_SERVER_UI_API_URL": self.api_url,
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.db_path}",
                "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING"),
            }
        )
        return env

    # ----------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "PrefectServer":
        """Start the server and block until ``/api/health`` answers (or raise PrefectServerError).

        On any failure nothing is left behind: the process group is ended and a temporary
        home removed (the error message carries the tail of the server log).
        """
        if self.running:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self._fixed_port and _port_in_use(self.port):
            raise PrefectServerError(f"port {self.port} on {HOST} is already in use")
        self.home.mkdir(parents=True, exist_ok=True)
        template = _template_path() if self.db_template else None
        fresh_db = not self.db_path.exists()
        if fresh_db and template is not None and template.is_file():
            _atomic_copy(template, self.db_path)
            fresh_db = False
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            started = time.monotonic()
            self._spawn()
            try:
                self._wait_healthy()
            except PrefectServerError:
                exited = self._proc is not None and self._proc.poll() is not None
                if exited and _port_in_use(self.port) and attempt + 1 < attempts:
                    # Someone took the port between free_port() and the bind: try another.
                    self.stop(_keep_home=True)
                    self.port = free_port()
                    continue
                raise
            self.startup_seconds = time.monotonic() - started
            if fresh_db and template is not None and not template.exists():
                _snapshot_db(self.db_path, template)
            return

    def _spawn(self) -> None:
        cmd = prefect_command() + ["server", "start", "--host", HOST, "--port", str(self.port), "--analytics-off"]
        if not self.services:
            cmd.append("--no-services")
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            cmd,
            env=self.server_env(),
            cwd=str(self.home),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own process group, so stop() also ends anything `prefect server start` spawns.
            start_new_session=True,
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        health = f"{self.api_url}/health"
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise PrefectServerError(
                    f"prefect server exited with code {code} before answering {health}; "
                    f"last lines of its log:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise PrefectServerError(
            f"prefect server did not answer {health} within {self.startup_timeout:.0f} s; "
            f"last lines of its log:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 15.0, *, _keep_home: bool = False) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc is not None:
            # Children that outlived the leader (uvicorn workers) share its group id.
            self._signal_group(proc, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_home and not _keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group id equals the leader's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PrefectServer(api_url={self.api_url!r}, home={str(self.home)!r}, {state})"


def _atomic_copy(src: Path, dest: Path) -> None:
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp), fsync=False, mode=0o666)


def _snapshot_db(src: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (backup API), written under a temporary name.

    Best effort: a template that cannot be written only costs the next start its migrations.
    """
    def backup(tmp: Path) -> None:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=10)
        try:
            target = sqlite3.connect(tmp)
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()
        finally:
            source.close()

    try:
        atomic_write(dest, backup, fsync=False, mode=0o666)
    except (OSError, sqlite3.Error):
        pass


def main(argv: list[str] | None = None) -> int:
    """Foreground mode: start a server, print its URLs, and stop it on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m lora.testing.prefect_server",
        description="Run a local Prefect server (loopback, own PREFECT_HOME) until interrupted.",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--home", type=Path, default=None, help="PREFECT_HOME (default: temporary, removed on exit)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")
    args = parser.parse_args(argv)
    try:
        server = PrefectServer(args.port, args.home, startup_timeout=args.timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except PrefectServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"Prefect server ready in {server.startup_seconds:.1f} s", flush=True)
        print(f"export PREFECT_API_URL={server.api_url}", flush=True)
        print(f"UI: {server.ui_url}/v2/runs", flush=True)
        print(f"PREFECT_HOME: {server.home} (log: {server.log_path})", flush=True)
        while not stop.wait(1.0):
            if not server.running:
                print(f"error: the server stopped; log {server.log_path}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
