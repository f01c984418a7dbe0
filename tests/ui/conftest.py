"""Fixtures for the Prefect UI browser test: Debian's Chromium, a real Prefect server, one run.

- ``browser``: headless Chromium from ``/usr/bin/chromium`` through Playwright (never a
  downloaded browser). Missing or failing to launch → the test is skipped with the reason
  (shown by ``-ra``), never silently passed.
- ``ui_server``: ``lora.testing.prefect_server.PrefectServer`` — ``prefect server start`` on a
  free loopback port with its own PREFECT_HOME / SQLite, UI included.
- ``completed_run``: the flow run the UI must show, as ``CompletedRun(flow_run_id,
  flow_run_name, artifact_keys)``.
- ``page``: a fresh browser context per test whose every non-loopback request is aborted; on
  failure a full-page screenshot goes to the test's tmp_path (its path is printed).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from lora.testing.prefect_server import PrefectServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHROMIUM = Path(os.environ.get("ANIMELORA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Requests the page may make: the loopback server (and inline data URIs). The UI also calls an
#: analytics host; that and anything else is aborted.
LOOPBACK = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")


class CompletedRun(NamedTuple):
    flow_run_id: str
    flow_run_name: str
    artifact_keys: list[str]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item so ``page`` knows whether the test failed."""
    report = yield
    setattr(item, f"ui_report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Debian Chromium, or a skip that says why it is not available."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"browser test skipped: {CHROMIUM} not found (install it with `apt-get install -y chromium`; "
            "`.ci/run` does)"
        )
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"browser test skipped: the playwright Python package is missing ({exc})")
    manager = sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, timeout=60_000)
    except PlaywrightError as exc:
        manager.stop()
        lines = [l.strip() for l in str(exc).splitlines() if l.strip() and not l.strip().startswith(("=", "<launching>"))]
        detail = " | ".join(lines[:4])[:400] or type(exc).__name__
        pytest.skip(f"browser test skipped: {CHROMIUM} failed to launch: {detail}")
    print(f"[ui] chromium {chromium.version} from {CHROMIUM}")
    try:
        yield chromium
    finally:
        chromium.close()
        manager.stop()


@pytest.fixture(scope="session")
def ui_server() -> Iterator[PrefectServer]:
    """A real `prefect server start` (UI on) for the browser tests, stopped at the end."""
    started = time.monotonic()
    with PrefectServer() as server:
        print(f"[ui] prefect server {server.api_url} ready in {time.monotonic() - started:.1f} s")
        yield server


def _run_train_lora(server: PrefectServer, workdir: Path) -> CompletedRun:
    run_name = f"ui-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, str(HERE / "ui_train_lora_run.py"), "--run-name", run_name,
           "--workdir", str(workdir)]
    proc = subprocess.run(
        cmd,
        env={**os.environ, **server.env(), "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=420,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"the train-lora run exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return CompletedRun(result["flow_run_id"], result["flow_run_name"], list(result["artifact_keys"]))


@pytest.fixture(scope="session")
def completed_run(browser, ui_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> CompletedRun:
    """The finished `train-lora` run (tiny model, loopback Danbooru) that the browser must find.

    ``tests/ui/ui_train_lora_run.py`` runs the real flow in a subprocess with the server's
    environment (``ui_server.env()``) and prints the flow run's id, name (``phase2a-<run>``)
    and artifact keys. It asks for ``browser`` first only so that a missing Chromium skips
    before the server and the run are paid for.
    """
    started = time.monotonic()
    run = _run_train_lora(ui_server, tmp_path_factory.mktemp("ui-run"))
    print(f"[ui] flow run {run.flow_run_name} ({run.flow_run_id}) done in {time.monotonic() - started:.1f} s")
    return run


@pytest.fixture()
def page(browser, request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh page whose context lets only loopback requests through; screenshots a failure."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    blocked: list[str] = []

    def route(route) -> None:
        url = route.request.url
        if LOOPBACK.match(url) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", route)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    try:
        yield pg
    finally:
        report = getattr(request.node, "ui_report_call", None)
        if report is not None and report.failed:
            shot = tmp_path / "failure.png"
            try:
                pg.screenshot(path=str(shot), full_page=True)
                print(f"[ui] screenshot of the failing page ({pg.url}): {shot}")
            except Exception as exc:  # the screenshot must never hide the real failure
                print(f"[ui] could not take a screenshot: {exc}")
        hosts = sorted({re.sub(r"^(\w+://[^/]+).*", r"\1", u) for u in blocked})
        if hosts:
            print(f"[ui] aborted non-loopback requests to: {', '.join(hosts)}")
        context.close()
