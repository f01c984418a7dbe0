"""One refresh of a data set, step by step: the only place the round loop lives.

    recover → round: plan budgets → collect → download and prepare → commit → (again, older
    posts, while below the target size) → finalize the version

Why one orchestration: the CLI and the ``dataset-refresh`` flow must behave the same, so both
run :class:`Refresh`. They differ only in how each step runs, which a :class:`RefreshSteps`
object decides: :class:`LocalSteps` calls the library in this process with one client (the
CLI, tests); the flow supplies steps that run each one as a Prefect task (downloads in
parallel shards, retries, progress artifacts). A change to the loop is made once, here.

The steps themselves live in modules by job: :mod:`lora.data.queries` (queries, budgets),
:mod:`lora.data.collect` (cursor walk, what to download), :mod:`lora.data.prepare`
(download, prepare, caption into staging), :mod:`lora.data.commit` (dedup, manifest, version,
crash repair). Each step is safe to repeat; a refresh interrupted anywhere continues when run
again. The names they export are re-exported here for callers that import them from this
module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from lora.booru import Credentials, DanbooruClient
from lora.data.candidates import Candidate, post_fields
from lora.data.captions import CaptionOptions
from lora.data.collect import (
    DEFAULT_BOORU_URL,
    DEFAULT_MAX_FILE_SIZE,
    IMAGE_EXTS,
    Collection,
    FetchFilters,
    collect_candidates,
    make_client,
)
from lora.data.commit import CommitResult, commit, finalize_version, recover
from lora.data.images import DEFAULT_MAX_PIXELS
from lora.data.manifest import DatasetPaths, dataset_lock, load_rows
from lora.data.prepare import (
    FINAL_DOWNLOAD_REASONS,
    PrepareOptions,
    ProgressCallback,
    download_and_prepare,
    prepare_local,
    shard,
)
from lora.data.queries import QuerySpec, make_query_specs, parse_query_spec, plan_budgets
from lora.data.state import QueryCursor, load_state
from lora.data.summary import RefreshSummary

__all__ = [
    # the orchestration
    "RefreshPlan",
    "RefreshSteps",
    "LocalSteps",
    "Refresh",
    "refresh_dataset",
    # the steps and their types, re-exported
    "DEFAULT_BOORU_URL",
    "DEFAULT_MAX_FILE_SIZE",
    "IMAGE_EXTS",
    "FINAL_DOWNLOAD_REASONS",
    "QuerySpec",
    "parse_query_spec",
    "make_query_specs",
    "FetchFilters",
    "PrepareOptions",
    "Candidate",
    "Collection",
    "CommitResult",
    "ProgressCallback",
    "plan_budgets",
    "post_fields",
    "collect_candidates",
    "download_and_prepare",
    "prepare_local",
    "commit",
    "finalize_version",
    "recover",
    "make_client",
    "shard",
]

Row = dict[str, Any]


@dataclass(frozen=True)
class RefreshPlan:
    """What one refresh asks for: its queries, how far to grow, what to accept and how to prepare.

    Without ``target_size`` one round takes up to ``limit`` new posts per query. With it,
    rounds continue (older posts) until the data set holds ``target_size`` images, the queries
    run out of posts, or ``max_rounds`` is reached.
    """

    queries: tuple[QuerySpec, ...]
    limit: int | None = None
    target_size: int | None = None
    filters: FetchFilters = field(default_factory=FetchFilters)
    options: PrepareOptions = field(default_factory=PrepareOptions)
    max_rounds: int = 5

    @property
    def query_map(self) -> dict[str, str]:
        """Query name → tags, as versions record them."""
        return {q.name: q.tags for q in self.queries}


class RefreshSteps(Protocol):
    """The jobs of one refresh, in the order :class:`Refresh` runs them.

    Implementations decide *how* a step runs (in this process, as a Prefect task, in shards);
    what each step does is the library function it names.
    """

    def recover(self) -> int:
        """Repair what an interrupted refresh left (:func:`recover`); return the kept count."""

    def collect(self, budgets: dict[str, int], retry_failed: bool) -> Collection:
        """Walk the cursors for this round's candidates (:func:`collect_candidates`)."""

    def download(self, candidates: Sequence[Candidate], round_no: int) -> list[Row]:
        """Download, prepare and caption into staging (:func:`download_and_prepare`)."""

    def commit(self, rows: list[Row], cursors: dict[str, QueryCursor]) -> CommitResult:
        """Dedup and move kept images in, append the manifest, store cursors (:func:`commit`)."""

    def finalize(self) -> str | None:
        """Write the version this refresh's kept rows wait for (:func:`finalize_version`)."""


class LocalSteps:
    """Every step in this process with one client: what ``animelora fetch`` runs."""

    def __init__(
        self,
        paths: DatasetPaths,
        plan: RefreshPlan,
        client: DanbooruClient,
        *,
        credentials: Credentials | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.paths = paths
        self.plan = plan
        self.client = client
        self.credentials = credentials
        self.on_progress = on_progress

    def recover(self) -> int:
        recover(self.paths)
        return sum(1 for r in load_rows(self.paths) if r["status"] == "kept")

    def collect(self, budgets: dict[str, int], retry_failed: bool) -> Collection:
        return collect_candidates(self.client, self.paths, self.plan.queries, filters=self.plan.filters,
                                  credentials=self.credentials, budgets=budgets, retry_failed=retry_failed)

    def download(self, candidates: Sequence[Candidate], round_no: int) -> list[Row]:
        return download_and_prepare(self.client, self.paths, candidates, self.plan.options,
                                    on_progress=_with_round(self.on_progress, round_no))

    def commit(self, rows: list[Row], cursors: dict[str, QueryCursor]) -> CommitResult:
        options = self.plan.options
        return commit(self.paths, rows, cursors, radius=options.radius, group_parents=options.group_parents,
                      queries=self.plan.query_map, finalize=False)

    def finalize(self) -> str | None:
        return finalize_version(self.paths, queries=self.plan.query_map)


RoundCallback = Callable[[int, CommitResult], None]


class Refresh:
    """Runs one refresh of ``paths`` by ``plan`` through ``steps``, under the data-set lock.

    ``on_round(round_no, result)`` is told after each committed round (the flow logs it).
    """

    def __init__(
        self,
        paths: DatasetPaths,
        plan: RefreshPlan,
        steps: RefreshSteps,
        *,
        lock_timeout: float = 0.0,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.paths = paths
        self.plan = plan
        self.steps = steps
        self.lock_timeout = lock_timeout
        self.on_round = on_round

    def run(self) -> RefreshSummary:
        plan, steps = self.plan, self.steps
        started = time.monotonic()
        summary = RefreshSummary(dataset=self.paths.name)
        with dataset_lock(self.paths, timeout=self.lock_timeout):
            kept_now = steps.recover()
            used: dict[str, int] = {}
            exhausted: set[str] = set()
            for round_no in range(1, plan.max_rounds + 1):
                state = load_state(self.paths)
                exhausted |= {q.name for q in plan.queries if state.cursor(q.name, q.tags).exhausted}
                budgets = plan_budgets(plan.queries, limit=plan.limit, target_size=plan.target_size,
                                       kept_now=kept_now, used=used, exhausted=exhausted)
                if not any(budgets.values()):
                    break
                collection = steps.collect(budgets, retry_failed=round_no == 1)
                summary.already_seen += collection.already_seen
                exhausted |= set(collection.exhausted)
                for candidate in collection.candidates:
                    used[candidate.query] = used.get(candidate.query, 0) + 1
                rows = steps.download(collection.candidates, round_no) if collection.candidates else []
                result = steps.commit(collection.rows + rows, collection.cursors)
                summary.add_rows(result.rows)
                summary.replaced += len(result.replaced)
                summary.rounds = round_no
                kept_now = result.total_kept
                if self.on_round is not None:
                    self.on_round(round_no, result)
                if plan.target_size is None or kept_now >= plan.target_size or not collection.candidates:
                    break
            summary.version = steps.finalize()
            if summary.version is not None:  # a kept image deleted by hand is left out of it
                kept_now = sum(1 for r in load_rows(self.paths) if r["status"] == "kept")
            summary.total_kept = kept_now
            summary.exhausted = sorted(exhausted)
        summary.elapsed_s = round(time.monotonic() - started, 3)
        return summary


def refresh_dataset(
    workspace: str | Path,
    name: str,
    queries: Sequence[QuerySpec],
    *,
    booru_url: str = DEFAULT_BOORU_URL,
    credentials: Credentials | None = None,
    target_size: int | None = None,
    limit: int | None = None,
    ratings: Sequence[str] = ("g", "s"),
    min_side: int = 512,
    trigger_word: str | None = None,
    caption: CaptionOptions | None = None,
    radius: int = 4,
    group_parents: bool = False,
    requests_per_second: float = 1.0,
    on_progress: ProgressCallback | None = None,
    max_rounds: int = 5,
    lock_timeout: float = 0.0,
    client: DanbooruClient | None = None,
    filters: FetchFilters | None = None,
    backoff_base: float = 1.0,
    allow_file_hosts: Sequence[str] = (),
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    file_timeout_s: float | None = None,
) -> RefreshSummary:
    """Fetch, dedup, caption and prepare new posts into ``<workspace>/datasets/<name>``, in this
    process (:class:`Refresh` with :class:`LocalSteps`).

    One version is written at the end if anything was kept. Safe to interrupt: run it again
    and it continues. ``allow_file_hosts`` are extra hosts file URLs may point to;
    ``max_file_size`` caps every download (and rejects posts declaring more); ``max_pixels``
    is the decompression-bomb limit; ``file_timeout_s`` is the time one file may take (default:
    from its size). ``filters``, when given, carries all of these instead.
    """
    paths = DatasetPaths.of(workspace, name).ensure()
    caption_options = caption or CaptionOptions()
    if trigger_word is not None:
        caption_options = replace(caption_options, trigger_word=trigger_word)
    filters = filters or FetchFilters(ratings=tuple(ratings), min_side=min_side,
                                      file_hosts=tuple(allow_file_hosts), max_file_size=max_file_size,
                                      max_pixels=max_pixels, file_timeout_s=file_timeout_s)
    plan = RefreshPlan(
        queries=tuple(queries), limit=limit, target_size=target_size, filters=filters,
        options=PrepareOptions(min_side=min_side, caption=caption_options, radius=radius,
                               group_parents=group_parents, max_pixels=filters.max_pixels),
        max_rounds=max_rounds,
    )
    own_client = client is None
    if client is None:
        client = make_client(booru_url, credentials, requests_per_second, backoff_base=backoff_base,
                             filters=filters)
    try:
        steps = LocalSteps(paths, plan, client, credentials=credentials, on_progress=on_progress)
        return Refresh(paths, plan, steps, lock_timeout=lock_timeout).run()
    finally:
        if own_client:
            client.close()


def _with_round(on_progress: ProgressCallback | None, round_no: int) -> ProgressCallback | None:
    if on_progress is None:
        return None

    def report(event: dict[str, Any]) -> None:
        on_progress({**event, "round": round_no})

    return report
