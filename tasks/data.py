"""Prefect tasks around the data pipeline's steps (``lora.data.refresh`` runs them in order;
the flow's ``TaskSteps`` maps each step onto a task here): thin wrappers that add retries,
sharding, progress and summary artifacts.

- ``collect-posts`` retries network failures; auth and query errors fail at once (retrying
  cannot fix a wrong key or a third tag).
- ``download-shard`` handles 25–50 posts per task run, not one run per image: thousands of
  tiny task runs would swamp the API server (SQLite locks) for no gain.
- ``commit-rows`` and ``finalize-version`` write the manifest, cursors and version; they hold
  the data-set lock, which is re-entrant inside the flow's process.

Credentials are resolved inside each task from the environment or a Secret block name, so the
key never travels as a task parameter and never reaches the API server or the logs.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from lora.booru import BooruAuthError, BooruQueryError, Credentials
from lora.data.manifest import load_rows
from lora.datapaths import DatasetPaths
from lora.data.candidates import Candidate
from lora.data.collect import Collection, FetchFilters, collect_candidates, make_client
from lora.data.commit import CommitResult, commit, finalize_version, recover
from lora.data.prepare import PrepareOptions, download_and_prepare
from lora.data.queries import QuerySpec
from lora.data.state import QueryCursor
from lora.data.summary import RefreshSummary
from tasks.artifacts import ProgressReporter, artifact_key
from tasks.retry import retry_unless

__all__ = [
    "resolve_credentials",
    "recover_dataset",
    "collect_posts",
    "download_shard",
    "commit_rows",
    "finalize_dataset_version",
    "publish_summary",
    "ShardProgress",
]


def resolve_credentials(block_name: str | None) -> Credentials | None:
    """Danbooru credentials: a Prefect ``Secret`` block holding ``login:api_key``, else the
    DANBOORU_LOGIN / DANBOORU_API_KEY environment variables, else None (anonymous)."""
    if block_name:
        from prefect.blocks.system import Secret

        value = Secret.load(block_name).get()
        if not isinstance(value, str) or ":" not in value:
            raise BooruAuthError(
                f"Secret block {block_name!r} must hold 'login:api_key' (a colon between the two)"
            )
        login, _, key = value.partition(":")
        return Credentials(login=login.strip(), api_key=key.strip())
    return Credentials.from_env()


#: Retry network trouble; a refused key or query fails the same way every time.
_not_a_config_error = retry_unless(BooruAuthError, BooruQueryError, ValueError)


@task(name="recover-dataset", cache_policy=NO_CACHE)
def recover_dataset(workspace: str, dataset: str) -> int:
    """Repair what an interrupted run left behind; returns the kept count."""
    paths = DatasetPaths.of(workspace, dataset)
    removed = recover(paths)
    if any(removed.values()):
        get_run_logger().info("recovered data set %s: %s", dataset, removed)
    return sum(1 for r in load_rows(paths) if r["status"] == "kept")


@task(
    name="collect-posts",
    retries=3,
    retry_delay_seconds=5,
    retry_condition_fn=_not_a_config_error,
    cache_policy=NO_CACHE,
)
def collect_posts(
    workspace: str,
    dataset: str,
    queries: Sequence[QuerySpec],
    budgets: dict[str, int],
    filters: FetchFilters,
    booru_url: str,
    requests_per_second: float,
    credentials_block: str | None = None,
    backoff_base: float = 1.0,
    retry_failed: bool = True,
) -> Collection:
    """Walk the query cursors and choose this round's download candidates."""
    credentials = resolve_credentials(credentials_block)
    paths = DatasetPaths.of(workspace, dataset)
    with make_client(booru_url, credentials, requests_per_second, backoff_base=backoff_base,
                     filters=filters) as client:
        collection = collect_candidates(
            client, paths, queries, filters=filters, credentials=credentials, budgets=budgets,
            retry_failed=retry_failed,
        )
    get_run_logger().info(
        "%d candidates, %d recorded without download, %d already in the data set",
        len(collection.candidates), len(collection.rows), collection.already_seen,
    )
    return collection


class ShardProgress:
    """A download counter shared by the shard tasks of one flow run (same process, threads)."""

    _registry: dict[str, "ShardProgress"] = {}
    _guard = threading.Lock()

    def __init__(self, reporter: ProgressReporter, total: int, label: str) -> None:
        self.reporter = reporter
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.kept = 0
        self._lock = threading.Lock()

    @classmethod
    def register(cls, key: str, progress: "ShardProgress") -> None:
        with cls._guard:
            cls._registry[key] = progress

    @classmethod
    def get(cls, key: str | None) -> "ShardProgress | None":
        with cls._guard:
            return cls._registry.get(key) if key else None

    @classmethod
    def drop(cls, key: str) -> None:
        with cls._guard:
            cls._registry.pop(key, None)

    def step(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.done += 1
            self.kept += event.get("status") == "kept"
            done, kept = self.done, self.kept
            self.reporter.update(
                100.0 * done / self.total,
                f"{self.label}: {done}/{self.total} posts prepared ({kept} kept so far)",
                force=done >= self.total,
            )


@task(
    name="download-shard",
    task_run_name="download-shard-{shard_no}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_not_a_config_error,
    cache_policy=NO_CACHE,
)
def download_shard(
    workspace: str,
    dataset: str,
    candidates: Sequence[Candidate],
    options: PrepareOptions,
    booru_url: str,
    requests_per_second: float,
    shard_no: int,
    credentials_block: str | None = None,
    progress_key: str | None = None,
    backoff_base: float = 1.0,
    filters: FetchFilters | None = None,
) -> list[dict[str, Any]]:
    """Download, prepare and caption one shard into the data set's staging folder.

    A retry (or a new flow run after a crash) re-uses what the last try finished. ``filters``
    carries the download limits (allowed file hosts, size cap)."""
    credentials = resolve_credentials(credentials_block)
    paths = DatasetPaths.of(workspace, dataset)
    progress = ShardProgress.get(progress_key)
    with make_client(booru_url, credentials, requests_per_second, backoff_base=backoff_base,
                     filters=filters) as client:
        rows = download_and_prepare(
            client, paths, candidates, options,
            on_progress=progress.step if progress else None,
        )
    kept = sum(1 for r in rows if r["status"] == "kept")
    get_run_logger().info("shard %d: %d posts, %d prepared", shard_no, len(rows), kept)
    return rows


@task(name="commit-rows", cache_policy=NO_CACHE)
def commit_rows(
    workspace: str,
    dataset: str,
    rows: list[dict[str, Any]],
    cursors: dict[str, QueryCursor],
    radius: int,
    group_parents: bool,
    queries: dict[str, str],
) -> CommitResult:
    """Phash dedup against the whole data set, append the manifest, then advance cursors."""
    return commit(
        DatasetPaths.of(workspace, dataset), rows, cursors, radius=radius,
        group_parents=group_parents, queries=queries, finalize=False,
    )


@task(name="finalize-version", cache_policy=NO_CACHE)
def finalize_dataset_version(workspace: str, dataset: str, queries: dict[str, str]) -> str | None:
    """Write the new version file if this refresh kept anything."""
    version = finalize_version(DatasetPaths.of(workspace, dataset), queries=queries)
    if version:
        get_run_logger().info("data set %s: wrote version %s", dataset, version)
    return version


@task(name="publish-refresh-summary", cache_policy=NO_CACHE)
def publish_summary(summary: RefreshSummary) -> str:
    """A table artifact: kept, duplicates and rejections by reason, per query below."""
    per_query = "\n".join(
        f"| {q} | {c.get('kept', 0)} | {c.get('duplicate', 0)} | {c.get('rejected', 0)} | {c.get('failed', 0)} |"
        for q, c in sorted(summary.per_query.items())
    )
    description = (
        f"**{summary.dataset}**: kept {summary.kept}, duplicates {summary.duplicates}, "
        f"rejected {summary.rejected}, failed {summary.failed}; version "
        f"{summary.version or 'none (nothing new)'}; {summary.total_kept} images in the data set.\n\n"
        + ("| query | kept | duplicates | rejected | failed |\n|---|---|---|---|---|\n" + per_query
           if per_query else "")
    )
    key = artifact_key("dataset-refresh", summary.dataset)
    create_table_artifact(table=summary.table_rows(), key=key, description=description)
    return key


def dataset_dir(workspace: str, dataset: str) -> Path:
    return DatasetPaths.of(workspace, dataset).root
