"""The `dataset-refresh` flow: grow a versioned data set from Danbooru queries.

The round loop is the library's (:class:`lora.data.refresh.Refresh`, the same one
``animelora fetch`` runs); this flow only says how each step runs, as Prefect tasks:
recover → collect (retried on network errors) → download shards on a small thread pool
(progress artifact) → commit (phash dedup against the whole data set, manifest, cursors) →
repeat older pages while below ``target_size`` → write one new version → summary table artifact.

Crash-safe: everything lives in the data-set folder. A killed run leaves prepared images in
``.staging/`` that the next run re-uses; cursors move only after rows are committed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from lora.data.candidates import Candidate
from lora.data.captions import CaptionOptions
from lora.data.collect import DEFAULT_BOORU_URL, DEFAULT_MAX_FILE_SIZE, Collection, FetchFilters
from lora.data.commit import CommitResult
from lora.data.images import DEFAULT_MAX_PIXELS
from lora.datapaths import DatasetPaths
from lora.data.prepare import PrepareOptions, shard
from lora.data.queries import make_query_specs
from lora.data.refresh import Refresh, RefreshPlan
from lora.data.state import QueryCursor
from tasks.artifacts import ProgressReporter, artifact_key
from tasks.library_logs import forward_library_logs
from tasks.data import (
    ShardProgress,
    collect_posts,
    commit_rows,
    download_shard,
    finalize_dataset_version,
    publish_summary,
    recover_dataset,
    resolve_credentials,
)

#: Posts per download task run: enough to amortise a task run, small enough to spread work.
SHARD_SIZE = 25
#: Parallel download shards; each gets an equal share of the request rate.
WORKERS = 2


class TaskSteps:
    """The refresh's steps as Prefect tasks of the running flow.

    Credentials travel only as the Secret block's name: each task resolves them itself, so the
    key is never a task parameter. Downloads run in shards of ``shard_size`` on the flow's
    thread pool, each with an equal share of the request rate, reporting to one progress bar.
    """

    def __init__(
        self,
        workspace: str,
        dataset: str,
        plan: RefreshPlan,
        *,
        booru_url: str,
        requests_per_second: float,
        credentials_block: str | None,
        backoff_base: float,
        shard_size: int,
        reporter: ProgressReporter,
        progress_key: str,
    ) -> None:
        self.workspace, self.dataset, self.plan = workspace, dataset, plan
        self.booru_url = booru_url
        self.requests_per_second = requests_per_second
        self.credentials_block = credentials_block
        self.backoff_base = backoff_base
        self.shard_size = shard_size
        self.reporter = reporter
        self.progress_key = progress_key

    def recover(self) -> int:
        return recover_dataset(self.workspace, self.dataset)

    def collect(self, budgets: dict[str, int], retry_failed: bool) -> Collection:
        return collect_posts(self.workspace, self.dataset, list(self.plan.queries), budgets, self.plan.filters,
                             self.booru_url, self.requests_per_second, self.credentials_block,
                             self.backoff_base, retry_failed=retry_failed)

    def download(self, candidates: Sequence[Candidate], round_no: int) -> list[dict[str, Any]]:
        run_key = f"{self.progress_key}:{round_no}:{id(self)}"
        ShardProgress.register(run_key, ShardProgress(
            self.reporter, len(candidates), f"{self.dataset} round {round_no}"))
        per_worker_rps = self.requests_per_second / WORKERS
        try:
            futures = [
                download_shard.submit(
                    self.workspace, self.dataset, part, self.plan.options, self.booru_url, per_worker_rps,
                    i, self.credentials_block, run_key, self.backoff_base, self.plan.filters,
                )
                for i, part in enumerate(shard(list(candidates), self.shard_size), start=1)
            ]
            return [row for future in futures for row in future.result()]
        finally:
            ShardProgress.drop(run_key)

    def commit(self, rows: list[dict[str, Any]], cursors: dict[str, QueryCursor]) -> CommitResult:
        options = self.plan.options
        return commit_rows(self.workspace, self.dataset, rows, cursors, options.radius,
                           options.group_parents, self.plan.query_map)

    def finalize(self) -> str | None:
        return finalize_dataset_version(self.workspace, self.dataset, self.plan.query_map)


def _ratings(value: str | list[str]) -> tuple[str, ...]:
    items = value if isinstance(value, list) else value.replace(" ", ",").split(",")
    return tuple(r.strip() for r in items if r.strip())


@flow(name="dataset-refresh", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))
def dataset_refresh(
    workspace: str = "workspace",
    dataset: str = "anime",
    tags: str = "1girl",
    queries: dict[str, str] | None = None,
    target_size: int | None = None,
    limit: int | None = 100,
    ratings: str = "g,s",
    min_side: int = 512,
    trigger_word: str | None = None,
    booru_url: str = DEFAULT_BOORU_URL,
    requests_per_second: float = 1.0,
    credentials_block: str | None = None,
    include_artist: bool = False,
    blacklist: list[str] | None = None,
    max_tags: int | None = None,
    radius: int = 4,
    group_parents: bool = False,
    shard_size: int = SHARD_SIZE,
    max_rounds: int = 5,
    lock_timeout_s: float = 1800.0,
    retry_backoff_s: float = 1.0,
    allow_file_hosts: list[str] | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_SIZE / 2**20,
    max_megapixels: float = DEFAULT_MAX_PIXELS / 1e6,
    file_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Fetch new posts into ``<workspace>/datasets/<dataset>`` and write a new version.

    ``queries`` maps names to tags (``{"sketch_aesthetic": "sketch"}``; a key
    ``"name:50"`` caps that query at 50 posts per run); without it ``tags`` is the one query
    ``default``. ``limit`` caps new posts per query per run; ``target_size`` keeps walking
    older posts until the data set holds that many images. ``credentials_block`` names a
    Prefect Secret holding ``login:api_key``; otherwise DANBOORU_LOGIN/DANBOORU_API_KEY are
    used when set. ``allow_file_hosts`` are hosts besides the booru's own (and its known CDN)
    that file URLs may name; ``max_file_mb`` caps every download; ``max_megapixels`` is the
    decompression-bomb limit; ``file_timeout_s`` is the most time one file may take (default:
    max(60 s, its size at 64 KiB/s); a file over it is retried by a later run). Returns the
    summary (kept, duplicates, rejected by reason, version, total).
    """
    forward_library_logs()
    logger = get_run_logger()
    specs = make_query_specs(tags, queries)
    resolve_credentials(credentials_block)  # fail early on a malformed block; value not kept
    if limit is None and target_size is None:
        limit = 100
    ws = str(Path(workspace).expanduser().resolve())
    paths = DatasetPaths.of(ws, dataset).ensure()
    filters = FetchFilters(ratings=_ratings(ratings), min_side=min_side,
                           file_hosts=tuple(allow_file_hosts or ()),
                           max_file_size=int(max_file_mb * 2**20),
                           max_pixels=int(max_megapixels * 1e6), file_timeout_s=file_timeout_s)
    options = PrepareOptions(
        min_side=min_side,
        max_pixels=filters.max_pixels,
        caption=CaptionOptions(trigger_word=trigger_word, include_artist=include_artist,
                               blacklist=tuple(blacklist or ()), max_tags=max_tags),
        radius=radius,
        group_parents=group_parents,
    )
    plan = RefreshPlan(queries=tuple(specs), limit=limit, target_size=target_size, filters=filters,
                       options=options, max_rounds=max_rounds)
    progress_key = artifact_key("dataset-refresh-progress", dataset)
    reporter = ProgressReporter.create(progress_key, f"{dataset}: collecting posts")
    steps = TaskSteps(ws, dataset, plan, booru_url=booru_url, requests_per_second=requests_per_second,
                      credentials_block=credentials_block, backoff_base=retry_backoff_s,
                      shard_size=shard_size, reporter=reporter, progress_key=progress_key)

    def log_round(round_no: int, result: CommitResult) -> None:
        logger.info("round %d: %d new images kept, %d in the data set",
                    round_no, result.added, result.total_kept)

    summary = Refresh(paths, plan, steps, lock_timeout=lock_timeout_s, on_round=log_round).run()
    reporter.update(100.0, f"{dataset}: done, {summary.kept} kept, version "
                    f"{summary.version or 'unchanged'}", force=True)
    publish_summary(summary)
    logger.info("%s", summary.format_table())
    return summary.to_dict()


if __name__ == "__main__":  # pragma: no cover
    dataset_refresh()
