"""The Prefect UI, opened in headless Chromium, shows a finished run and its artifacts.

What a user does after `prefect deployment run train-lora/...`: search the runs list for the
run, open it, see it Completed, open its Artifacts tab, open the report. Every check uses
Playwright's auto-retrying ``expect`` (the V2 UI fills in 1–3 s after navigation).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

expect = pytest.importorskip(
    "playwright.sync_api", reason="browser test skipped: the playwright Python package is missing"
).expect

pytestmark = pytest.mark.browser

#: Generous for 2 busy CPU cores; `expect` returns as soon as the condition holds.
UI_TIMEOUT_MS = 20_000


def _key_with_prefix(keys: list[str], prefix: str) -> str:
    matches = [k for k in keys if k.startswith(prefix)]
    assert matches, f"no artifact key starts with {prefix!r}: {keys}"
    return matches[0]


def _artifact_card(page: Page, key: str):
    """The card/row in a run's Artifacts tab that links to the artifact named ``key``."""
    return page.locator("a[href*='/artifacts/artifact/']").filter(has=page.get_by_text(key, exact=True))


def test_ui_runs_search_finds_the_completed_run(page: Page, ui_server, completed_run) -> None:
    search_term = quote(completed_run.flow_run_name)
    page.goto(f"{ui_server.ui_url}/v2/runs?tab=flow-runs&flow-run-search={search_term}")

    search = page.get_by_role("textbox", name="Search by flow run name")
    expect(search).to_have_value(completed_run.flow_run_name, timeout=UI_TIMEOUT_MS)
    run_link = page.locator(f"a[href*='/runs/flow-run/{completed_run.flow_run_id}']").filter(
        has_text=completed_run.flow_run_name
    )
    expect(run_link.first).to_be_visible(timeout=UI_TIMEOUT_MS)

    run_link.first.click()
    expect(page).to_have_url(re.compile(rf"/v2/runs/flow-run/{completed_run.flow_run_id}"), timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)


def test_ui_run_page_shows_completed_state(page: Page, ui_server, completed_run) -> None:
    page.goto(f"{ui_server.ui_url}/v2/runs/flow-run/{completed_run.flow_run_id}")

    expect(page.get_by_text(completed_run.flow_run_name, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    for bad in ("Failed", "Crashed", "Running"):
        expect(page.get_by_text(bad, exact=True)).to_have_count(0)


def test_ui_artifacts_tab_lists_every_artifact(page: Page, ui_server, completed_run) -> None:
    page.goto(f"{ui_server.ui_url}/v2/runs/flow-run/{completed_run.flow_run_id}?tab=Artifacts")

    for key in completed_run.artifact_keys:
        expect(_artifact_card(page, key), f"artifact {key} in the Artifacts tab").to_have_count(
            1, timeout=UI_TIMEOUT_MS
        )
    progress = _artifact_card(page, _key_with_prefix(completed_run.artifact_keys, "training-progress-"))
    expect(progress).to_contain_text("PROGRESS", ignore_case=True)
    table = _artifact_card(page, _key_with_prefix(completed_run.artifact_keys, "epoch-losses-"))
    expect(table).to_contain_text("TABLE", ignore_case=True)


def test_ui_report_artifact_renders_markdown_table_and_plot(page: Page, ui_server, completed_run) -> None:
    report_key = _key_with_prefix(completed_run.artifact_keys, "training-report-")
    page.goto(f"{ui_server.ui_url}/v2/runs/flow-run/{completed_run.flow_run_id}?tab=Artifacts")
    _artifact_card(page, report_key).click(timeout=UI_TIMEOUT_MS)

    expect(page).to_have_url(re.compile(r"/v2/artifacts/artifact/[0-9a-f-]{36}"), timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text(report_key, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    # The markdown table is rendered as an HTML table, not shown as raw `| a | b |` text.
    table = page.locator("table").first
    expect(table).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(table.locator("thead th").first).to_be_visible()
    expect(table.locator("tbody tr"), "the report table has no data rows").not_to_have_count(0)
    # The loss plot embedded as a data URI is decoded and drawn (not a broken-image icon).
    expect(page.locator("img[src^='data:image/png']").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    page.wait_for_function(
        """() => [...document.querySelectorAll("img[src^='data:image/png']")]
                 .some(img => img.complete && img.naturalWidth > 0)""",
        timeout=UI_TIMEOUT_MS,
    )


def test_ui_table_artifact_shows_per_epoch_losses(page: Page, ui_server, completed_run) -> None:
    key = _key_with_prefix(completed_run.artifact_keys, "epoch-losses-")
    page.goto(f"{ui_server.ui_url}/v2/runs/flow-run/{completed_run.flow_run_id}?tab=Artifacts")
    _artifact_card(page, key).click(timeout=UI_TIMEOUT_MS)

    table = page.locator("table").first
    expect(table).to_be_visible(timeout=UI_TIMEOUT_MS)
    for header in ("epoch", "loss"):
        expect(table.locator("th").filter(has_text=re.compile(rf"^\s*{header}\s*$"))).to_have_count(1)
    expect(table.locator("tbody tr")).not_to_have_count(0)


def test_ui_samples_grid_artifact_draws_the_grid(page: Page, ui_server, completed_run) -> None:
    key = _key_with_prefix(completed_run.artifact_keys, "samples-grid-")
    page.goto(f"{ui_server.ui_url}/v2/runs/flow-run/{completed_run.flow_run_id}?tab=Artifacts")
    _artifact_card(page, key).click(timeout=UI_TIMEOUT_MS)

    expect(page).to_have_url(re.compile(r"/v2/artifacts/artifact/[0-9a-f-]{36}"), timeout=UI_TIMEOUT_MS)
    # The grid travels inside the artifact (the UI cannot open the worker's files) and is drawn.
    expect(page.locator("img[src^='data:image/']").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    page.wait_for_function(
        """() => [...document.querySelectorAll("img[src^='data:image/']")]
                 .some(img => img.complete && img.naturalWidth > 0)""",
        timeout=UI_TIMEOUT_MS,
    )
    # Where the full-size file is, as text to copy, not a file:// link that opens nothing.
    expect(page.get_by_text(re.compile(r"/samples/grid\.png")).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(page.locator("a[href^='file:']")).to_have_count(0)


def test_ui_lora_files_artifact_shows_paths(page: Page, ui_server, completed_run) -> None:
    key = _key_with_prefix(completed_run.artifact_keys, "lora-files-")
    page.goto(f"{ui_server.ui_url}/v2/runs/flow-run/{completed_run.flow_run_id}?tab=Artifacts")
    _artifact_card(page, key).click(timeout=UI_TIMEOUT_MS)

    table = page.locator("table").first
    expect(table).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(table.locator("th").filter(has_text=re.compile(r"^\s*path\s*$"))).to_have_count(1)
    expect(table.locator("tbody tr").filter(has_text=re.compile(r"/lora/.*\.safetensors"))).not_to_have_count(0)
