"""The `dataset-refresh` flow: grow a versioned data set from Danbooru queries.

collect (cursor walk, skip reasons, md5 pre-dedup) → download shards on a small thread pool
(progress artifact) → commit (phash dedup against the whole data set, manifest, cursors) →
repeat older pages while below ``target_size`` → write one new version → summary table artifact.

Crash-safe: everything lives in the data-set folder. A killed run leaves prepared images in
``.staging/`` that the next run re-uses; cursors move only after rows are committed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from lora.data.captions import CaptionOptions
from lora.data.manifest import DatasetPaths, dataset_lock
from lora.data.refresh import (
    DEFAULT_BOORU_URL,
    FetchFilters,
    PrepareOptions,
    make_query_specs,
    plan_budgets,
    shard,
)
from lora.data.state import load_state
from lora.data.summary import RefreshSummary
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
) -> dict[str, Any]:
    """Fetch new posts into ``<workspace>/datasets/<dataset>`` and write a new version.

    ``queries`` maps names to tags (``{"sketch_aesthetic": "sketch"}``; a key
    ``"name:50"`` caps that query at 50 posts per run); without it ``tags`` is the one query
    ``default``. ``limit`` caps new posts per query per run; ``target_size`` keeps walking
    older posts until the data set holds that many images. ``credentials_block`` names a
    Prefect Secret holding ``login:api_key``; otherwise DANBOORU_LOGIN/DANBOORU_API_KEY are
    used when set. Returns the summary (kept, duplicates, rejected by reason, version, total).
    """
    forward_library_logs()
    logger = get_run_logger()
    specs = make_query_specs(tags, queries)
    resolve_credentials(credentials_block)  # fail early on a malformed block; value not kept
    if limit is None and target_size is None:
        limit = 100
    ws = str(Path(workspace).expanduser().resolve())
    paths = DatasetPaths.of(ws, dataset).ensure()
    filters = FetchFilters(ratings=_ratings(ratings), min_side=min_side)
    options = PrepareOptions(
        min_side=min_side,
        caption=CaptionOptions(trigger_word=trigger_word, include_artist=include_artist,
                               blacklist=tuple(blacklist or ()), max_tags=max_tags),
        radius=radius,
        group_parents=group_parents,
    )
    query_map = {q.name: q.tags for q in specs}
    summary = RefreshSummary(dataset=dataset)
    per_worker_rps = requests_per_second / WORKERS

    with dataset_lock(paths, timeout=lock_timeout_s):
        kept_now = recover_dataset(ws, dataset)
        progress_key = artifact_key("dataset-refresh-progress", dataset)
        reporter = ProgressReporter.create(progress_key, f"{dataset}: collecting posts")
        used: dict[str, int] = {}
        exhausted: set[str] = set()
        for round_no in range(1, max_rounds + 1):
            state = load_state(paths)
            exhausted |= {q.name for q in specs if state.cursor(q.name, q.tags).exhausted}
            budgets = plan_budgets(specs, limit=limit, target_size=target_size,
                                   kept_now=kept_now, used=used, exhausted=exhausted)
            if not any(budgets.values()):
                break
            collection = collect_posts(ws, dataset, specs, budgets, filters, booru_url,
                                       requests_per_second, credentials_block, retry_backoff_s,
                                       retry_failed=round_no == 1)
            summary.already_seen += collection.already_seen
            exhausted |= set(collection.exhausted)
            for candidate in collection.candidates:
                used[candidate.query] = used.get(candidate.query, 0) + 1
            shards = shard(collection.candidates, shard_size) if collection.candidates else []
            run_key = f"{progress_key}:{round_no}:{id(summary)}"
            ShardProgress.register(run_key, ShardProgress(
                reporter, len(collection.candidates), f"{dataset} round {round_no}"))
            try:
                futures = [
                    download_shard.submit(
                        ws, dataset, part, options, booru_url, per_worker_rps, i,
                        credentials_block, run_key, retry_backoff_s,
                    )
                    for i, part in enumerate(shards, start=1)
                ]
                rows = [row for future in futures for row in future.result()]
            finally:
                ShardProgress.drop(run_key)
            result = commit_rows(ws, dataset, collection.rows + rows, collection.cursors,
                                 radius, group_parents, query_map)
            summary.add_rows(result["rows"])
            summary.rounds = round_no
            kept_now = result["total_kept"]
            logger.info("round %d: %d new images kept, %d in the data set",
                        round_no, result["added"], kept_now)
            if target_size is None or kept_now >= target_size or not collection.candidates:
                break
        summary.version = finalize_dataset_version(ws, dataset, query_map)
        summary.total_kept = kept_now
        summary.exhausted = sorted(exhausted)
        reporter.update(100.0, f"{dataset}: done, {summary.kept} kept, version "
                        f"{summary.version or 'unchanged'}", force=True)
    publish_summary(summary)
    logger.info("%s", summary.format_table())
    return summary.to_dict()


if __name__ == "__main__":  # pragma: no cover
    dataset_refresh()
