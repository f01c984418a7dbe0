"""The fetch → dedup → caption → prepare pipeline, as composable steps.

Why steps: the CLI runs them in one process (:func:`refresh_dataset`), the Prefect flow runs
them as tasks (collect once, download in shards on a thread pool, commit once) and reports
progress in between. Each step is safe to repeat:

1. :func:`collect_candidates` walks each named query's cursor (newer posts first, then older
   ones until the per-run limit / target size), records posts that need no download (deleted,
   banned, videos, exact md5 duplicates of the data set …) as rows, and returns the candidates.
2. :func:`download_and_prepare` downloads a shard of candidates into ``.staging/``, prepares
   and captions them there, and leaves a small JSON "pending row" per post, so a re-run after a
   crash re-uses finished work instead of downloading again.
3. :func:`commit` deduplicates by phash against the whole data set (and the batch itself),
   moves kept images into ``images/``, appends the manifest, then advances cursors.
4. :func:`finalize_version` writes the new ``versions/vNNNN.json`` listing every kept file.

The manifest (and the files it names) is the truth; versions and cursors are derived and are
repaired by :func:`recover` when a crash left them behind.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from lora.booru import (
    Credentials,
    DanbooruClient,
    DownloadError,
    MalformedPost,
    Post,
    build_query,
    normalize_host,
    skip_reason,
)
from lora.data.captions import CaptionOptions, TagSet, build_caption, write_caption
from lora.data.duplicates import KeptCopies, better_copy, duplicate_kind, inherit_caption
from lora.data.images import DEFAULT_MAX_PIXELS, ImageRejected, atomic_write_bytes, prepare_image
from lora.data.manifest import (
    COLUMNS,
    DatasetPaths,
    dataset_lock,
    load_rows,
    new_row,
    now_utc,
    reason_kind,
    save_rows,
    upsert_rows,
)
from lora.data.state import QueryCursor, load_state, save_state
from lora.data.summary import RefreshSummary
from lora.data.versions import latest_version, list_versions, next_version, write_version

__all__ = [
    "DEFAULT_BOORU_URL",
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
    "collect_candidates",
    "download_and_prepare",
    "prepare_local",
    "commit",
    "finalize_version",
    "recover",
    "make_client",
    "refresh_dataset",
    "shard",
]

log = logging.getLogger(__name__)

DEFAULT_BOORU_URL = "https://danbooru.donmai.us"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "avif", "bmp")
DEFAULT_MAX_FILE_SIZE = 50 * 1024 * 1024

#: ``on_progress`` receives one dict per finished post:
#: ``{"stage": "download", "done": int, "total": int, "id": str, "status": str, "reason": str|None}``
ProgressCallback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Queries and options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuerySpec:
    """A named query of a data set, e.g. ``QuerySpec("sketch_aesthetic", "sketch", limit=150)``.

    ``limit`` caps how many new posts (download candidates) one run takes for this query;
    None uses the run's global limit.
    """

    name: str
    tags: str
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "=:/ \t\n"):
            raise ValueError(f"query name {self.name!r} must be non-empty without spaces, '=', ':' or '/'")
        if not self.tags.strip():
            raise ValueError(f"query {self.name!r} has no tags")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"query {self.name!r}: limit must be >= 0, got {self.limit}")


def parse_query_spec(text: str, tags: str | None = None) -> QuerySpec:
    """``"NAME=TAGS"`` or ``"NAME:LIMIT=TAGS"`` (or a key ``NAME[:LIMIT]`` plus ``tags``)."""
    if tags is None:
        if "=" not in text:
            raise ValueError(f"query {text!r} must look like NAME=TAGS or NAME:LIMIT=TAGS")
        text, tags = text.split("=", 1)
    name, _, limit = text.strip().partition(":")
    try:
        parsed_limit = int(limit) if limit else None
    except ValueError:
        raise ValueError(f"query {text!r}: the limit after ':' must be a whole number") from None
    return QuerySpec(name=name.strip(), tags=" ".join(tags.split()), limit=parsed_limit)


def make_query_specs(
    tags: str | None, queries: dict[str, str] | Sequence[str] | None = None
) -> list[QuerySpec]:
    """The run's queries: each named query, plus ``tags`` as query ``default`` when given alone."""
    specs: list[QuerySpec] = []
    if isinstance(queries, dict):
        specs = [parse_query_spec(k, v) for k, v in queries.items()]
    elif queries:
        specs = [parse_query_spec(q) for q in queries]
    if not specs and tags and tags.strip():
        specs = [QuerySpec("default", " ".join(tags.split()))]
    if not specs:
        raise ValueError("no query: give tags or at least one NAME=TAGS query")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"query names must be unique, got {names}")
    return specs


@dataclass(frozen=True)
class FetchFilters:
    """What a post must be to be downloaded (part of the query where Danbooru can filter)."""

    ratings: tuple[str, ...] = ("g", "s")
    min_side: int = 512
    filetypes: tuple[str, ...] | None = None
    allowed_exts: tuple[str, ...] = IMAGE_EXTS
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Hosts besides the booru's own (and its known CDN) that file URLs may point to.
    file_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_file_size <= 0:
            raise ValueError(f"max_file_size must be positive, got {self.max_file_size}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        object.__setattr__(self, "file_hosts", tuple(normalize_host(h) for h in self.file_hosts))


#: Download failures that will fail the same way on every later run: recorded once as
#: ``rejected`` (not ``failed``), so they are not fetched again.
FINAL_DOWNLOAD_REASONS = ("oversized", "unsupported-url-scheme", "file-host-not-allowed",
                          "too-many-redirects", "bad-file-url")


@dataclass(frozen=True)
class PrepareOptions:
    """How candidates become data-set images and captions, and how near-duplicates are judged."""

    min_side: int = 512
    max_pixels: int = DEFAULT_MAX_PIXELS
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    radius: int = 4
    group_parents: bool = False


# --------------------------------------------------------------------------------------------
# Candidates and rows
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One post (or local file) to download/prepare. ``fields`` are its manifest fields so far."""

    id: str
    query: str
    md5: str | None
    fields: dict[str, Any]
    post: Post | None = None
    source_path: str | None = None
    caption: str | None = None

    @property
    def post_id(self) -> int | None:
        return self.fields.get("post_id")


@dataclass
class Collection:
    """What :func:`collect_candidates` found.

    ``rows``: posts recorded without a download (rejected / md5 duplicates), to be committed.
    ``cursors``: the cursors to store once everything here is committed.
    """

    candidates: list[Candidate] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    cursors: dict[str, QueryCursor] = field(default_factory=dict)
    already_seen: int = 0
    exhausted: list[str] = field(default_factory=list)


@dataclass
class CommitResult:
    """What one commit wrote. ``replaced``: earlier kept rows a better copy superseded."""

    rows: list[dict[str, Any]]
    added: int
    duplicates: int
    total_kept: int
    version: str | None
    replaced: list[dict[str, Any]] = field(default_factory=list)


def _tags(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return " ".join(value.split())
    return " ".join(str(t) for t in value)


def post_fields(post: Post, query: str) -> dict[str, Any]:
    """Manifest fields known from the API, before any download."""
    return {
        "post_id": int(post.id),
        "query": query,
        "md5": post.md5 or None,
        "width": post.width,
        "height": post.height,
        "rating": post.rating,
        "score": post.score,
        "file_ext": post.file_ext,
        "file_size": post.file_size,
        "tags_general": _tags(post.tags_general),
        "tags_character": _tags(post.tags_character),
        "tags_copyright": _tags(post.tags_copyright),
        "tags_artist": _tags(post.tags_artist),
        "tags_meta": _tags(post.tags_meta),
        "source": post.source or None,
        "file_url": post.file_url or None,
        "parent_id": post.parent_id,
    }


def _row(candidate_id: str, status: str, fields: dict[str, Any], **more: Any) -> dict[str, Any]:
    merged = {**fields, **more}
    return new_row(candidate_id, status, **merged)


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def make_client(
    booru_url: str = DEFAULT_BOORU_URL,
    credentials: Credentials | None = None,
    requests_per_second: float = 1.0,
    *,
    user_agent: str | None = None,
    backoff_base: float = 1.0,
    filters: FetchFilters | None = None,
) -> DanbooruClient:
    """A client with the project's defaults (descriptive User-Agent, rate limit, retries);
    ``filters`` sets its download limits (allowed file hosts, the size cap)."""
    filters = filters or FetchFilters()
    return DanbooruClient(
        booru_url,
        credentials=credentials,
        user_agent=user_agent,
        requests_per_second=requests_per_second,
        backoff_base=backoff_base,
        file_hosts=filters.file_hosts,
        max_download_bytes=filters.max_file_size,
    )


# --------------------------------------------------------------------------------------------
# 1. collect
# --------------------------------------------------------------------------------------------


def plan_budgets(
    queries: Sequence[QuerySpec],
    *,
    limit: int | None,
    target_size: int | None,
    kept_now: int,
    used: dict[str, int] | None = None,
    exhausted: Iterable[str] = (),
) -> dict[str, int]:
    """How many new candidates each query may take now.

    ``limit`` (or a query's own limit) caps one run; ``target_size`` asks for just enough to
    reach that many kept images, split evenly over the queries that still have older posts.
    """
    used = used or {}
    exhausted = set(exhausted)
    if limit is None and target_size is None and any(q.limit is None for q in queries):
        raise ValueError("give a per-run limit or a target size")
    budgets: dict[str, int] = {}
    for q in queries:
        cap = q.limit if q.limit is not None else limit
        budgets[q.name] = max(0, cap - used.get(q.name, 0)) if cap is not None else 1 << 30
    if target_size is not None:
        need = max(0, target_size - kept_now)
        active = [q.name for q in queries if budgets[q.name] > 0] or [q.name for q in queries]
        open_ = [n for n in active if n not in exhausted] or active
        share = math.ceil(need / len(open_)) if open_ else 0
        for name in budgets:
            # Exhausted queries still look for newer posts with their share.
            budgets[name] = min(budgets[name], share)
    return budgets


def _query_string(spec: QuerySpec, filters: FetchFilters, credentials: Credentials | None) -> str:
    return build_query(
        spec.tags,
        ratings=list(filters.ratings) if filters.ratings else None,
        min_width=filters.min_side or None,
        min_height=filters.min_side or None,
        filetypes=list(filters.filetypes) if filters.filetypes else None,
        exclude_deleted=True,
        max_user_tags=2 if credentials is None else None,
    )


@dataclass
class _Known:
    """What the data set already holds, for skipping and exact dedup."""

    final_ids: set[str]
    kept_md5: dict[str, str]
    kept: int
    retry: dict[str, dict[str, Any]]

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], max_attempts: int = 3) -> "_Known":
        final_ids: set[str] = set()
        retry: dict[str, dict[str, Any]] = {}
        kept_md5: dict[str, str] = {}
        kept = 0
        for row in rows:
            if row["status"] == "failed" and (row.get("attempts") or 1) < max_attempts:
                retry[row["id"]] = row
            else:
                final_ids.add(row["id"])
            if row["status"] == "kept":
                kept += 1
                if row.get("md5"):
                    kept_md5.setdefault(row["md5"], row["id"])
        return cls(final_ids, kept_md5, kept, retry)


def collect_candidates(
    client: DanbooruClient,
    paths: DatasetPaths,
    queries: Sequence[QuerySpec],
    *,
    limit: int | None = None,
    target_size: int | None = None,
    filters: FetchFilters = FetchFilters(),
    credentials: Credentials | None = None,
    budgets: dict[str, int] | None = None,
    page_size: int = 200,
    retry_failed: bool = True,
) -> Collection:
    """Walk each query's cursor and pick the posts to download.

    Per query: posts newer than ``newest_id`` first (``after_id``); then, while its budget is
    not used up and older posts remain, posts older than ``oldest_id`` (``before_id``). Posts
    the manifest already has are passed over without counting; posts that need no download are
    recorded as rows (``deleted``, ``banned``, ``not-an-image:mp4``, ``md5-duplicate-of:<id>`` …).
    Cursors are returned, not saved: :func:`commit` saves them with the rows. Posts whose
    download failed in an earlier run are retried (up to 3 attempts in all) with ``retry_failed``.
    """
    rows = load_rows(paths)
    known = _Known.from_rows(rows)
    state = load_state(paths)
    if budgets is None:
        budgets = plan_budgets(
            queries, limit=limit, target_size=target_size, kept_now=known.kept,
            exhausted=[q.name for q in queries if state.queries.get(q.name, QueryCursor("")).exhausted],
        )
    out = Collection()
    batch_ids: set[str] = set()
    batch_md5: dict[str, int] = {}  # md5 -> index into out.candidates
    names = {q.name for q in queries}
    if retry_failed:
        # Posts whose download failed in an earlier run (the cursor has moved past them).
        for pid, row in known.retry.items():
            if row.get("query") in names and row.get("file_url") and row.get("md5") and pid.isdigit():
                batch_ids.add(pid)
                batch_md5.setdefault(row["md5"], len(out.candidates))
                out.candidates.append(_retry_candidate(row))

    for spec in queries:
        query = _query_string(spec, filters, credentials)
        cursor = state.cursor(spec.name, spec.tags, query)
        if cursor.query is None:
            cursor = replace(cursor, query=query)
        budget = budgets.get(spec.name, 0)
        new = replace(cursor)
        taken = 0
        if budget <= 0:
            out.cursors[spec.name] = new
            continue
        per_page = max(1, min(page_size, 200))

        def record_malformed(bad: MalformedPost, query: str = spec.name) -> None:
            """A post the API listed but that cannot be read: recorded once, never fetched."""
            if bad.key in known.final_ids or bad.key in batch_ids:
                out.already_seen += 1
                return
            batch_ids.add(bad.key)
            out.rows.append(_row(bad.key, "rejected", {"post_id": bad.post_id, "query": query},
                                 reason=f"malformed-post:{bad.field}"))

        def walk(posts: Iterator[Post]) -> tuple[bool, list[int]]:
            """Consume posts until the budget is used; (reached the end, ids seen in order)."""
            nonlocal taken
            seen: list[int] = []
            for post in posts:
                seen.append(int(post.id))
                pid = str(post.id)
                if pid in known.final_ids or pid in batch_ids:
                    out.already_seen += 1
                    continue
                batch_ids.add(pid)
                fields = post_fields(post, spec.name)
                reason = skip_reason(
                    post,
                    max_file_size=filters.max_file_size,
                    max_pixels=filters.max_pixels,
                    allowed_exts=filters.allowed_exts,
                )
                if reason is None and filters.min_side and 0 < min(post.width, post.height) < filters.min_side:
                    reason = "too-small"  # from the API's size: no download needed
                if reason:
                    out.rows.append(_row(pid, "rejected", fields, reason=reason))
                    continue
                md5 = post.md5
                original = known.kept_md5.get(md5)
                if original:
                    out.rows.append(_row(pid, "duplicate", fields,
                                         reason=f"md5-duplicate-of:{original}", duplicate_of=original))
                    continue
                if md5 in batch_md5:
                    # Byte-identical posts in one batch: download only the earlier upload.
                    i = batch_md5[md5]
                    other = out.candidates[i]
                    if int(post.id) < int(other.post_id or 0):
                        out.candidates[i] = Candidate(id=pid, query=spec.name, md5=md5, fields=fields, post=post)
                        pid, fields, original = other.id, other.fields, pid
                    else:
                        original = other.id
                    out.rows.append(_row(pid, "duplicate", fields,
                                         reason=f"md5-duplicate-of:{original}", duplicate_of=original))
                    continue
                batch_md5[md5] = len(out.candidates)
                out.candidates.append(Candidate(id=pid, query=spec.name, md5=md5, fields=fields, post=post))
                taken += 1
                if taken >= budget:
                    return False, seen
            return True, seen

        if cursor.newest_id is not None:
            complete, seen = walk(client.iter_posts(query, after_id=cursor.newest_id, limit=per_page,
                                                    on_malformed=record_malformed))
            ascending = all(a < b for a, b in zip(seen, seen[1:]))
            if seen and (complete or ascending):
                # Every post between the old and the new newest id has been looked at.
                new.newest_id = max(cursor.newest_id, max(seen))
        if taken < budget and not cursor.exhausted:
            complete, seen = walk(client.iter_posts(query, before_id=cursor.oldest_id, limit=per_page,
                                                    on_malformed=record_malformed))
            if seen:
                new.oldest_id = min(seen) if cursor.oldest_id is None else min(cursor.oldest_id, min(seen))
                if cursor.newest_id is None:
                    new.newest_id = max(seen)
            if complete:
                new.exhausted = True
                out.exhausted.append(spec.name)
        new.updated_at = now_utc().isoformat(timespec="seconds")
        out.cursors[spec.name] = new
    return out


def _retry_candidate(row: dict[str, Any]) -> Candidate:
    """A candidate rebuilt from a failed manifest row (no API request needed)."""
    post = Post(
        id=int(row["id"]), md5=row.get("md5"), file_url=row.get("file_url"),
        file_ext=row.get("file_ext") or "", file_size=row.get("file_size") or 0,
        width=row.get("width") or 0, height=row.get("height") or 0, rating=row.get("rating") or "",
        score=row.get("score") or 0, parent_id=row.get("parent_id"), source=row.get("source") or "",
        **{f"tags_{c}": (row.get(f"tags_{c}") or "").split()
           for c in ("general", "character", "copyright", "artist", "meta")},
    )
    fields = post_fields(post, row["query"])
    fields["attempts"] = int(row.get("attempts") or 1)
    return Candidate(id=row["id"], query=row["query"], md5=post.md5, fields=fields, post=post)


def shard(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Split work into shards of ``size`` (the last may be smaller)."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------
# 2. download and prepare
# --------------------------------------------------------------------------------------------


def _staging(paths: DatasetPaths, kind: str) -> Path:
    folder = paths.staging / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _pending_path(paths: DatasetPaths, candidate_id: str) -> Path:
    return _staging(paths, "rows") / f"{candidate_id}.json"


def _write_pending(paths: DatasetPaths, row: dict[str, Any]) -> None:
    atomic_write_bytes(_pending_path(paths, row["id"]), json.dumps(row, default=str).encode())


def _read_pending(paths: DatasetPaths, candidate: Candidate) -> dict[str, Any] | None:
    """A finished (uncommitted) result for this candidate from an earlier, interrupted run."""
    path = _pending_path(paths, candidate.id)
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if raw.get("md5") != candidate.md5 or raw.get("status") not in ("kept", "rejected"):
        return None
    if raw["status"] == "kept":
        name = Path(raw.get("file") or "").name
        if not name or not (
            (paths.staging / "prepared" / name).exists() or (paths.images / name).exists()
        ):
            return None
    raw["seen_at"] = now_utc()
    raw["committed_at"] = None
    return new_row(raw.pop("id"), raw.pop("status"), **{k: v for k, v in raw.items() if k in COLUMNS})


def _prepare_one(
    paths: DatasetPaths,
    candidate: Candidate,
    source: Path,
    options: PrepareOptions,
    fields: dict[str, Any],
) -> dict[str, Any]:
    prepared_dir = _staging(paths, "prepared")
    try:
        image = prepare_image(
            source, prepared_dir / candidate.id, min_side=options.min_side, max_pixels=options.max_pixels
        )
    except ImageRejected as exc:
        return _row(candidate.id, "rejected", fields, reason=exc.reason)
    if candidate.caption is not None:
        caption = _with_trigger(candidate.caption, options.caption.trigger_word)
    else:
        caption = build_caption(TagSet.from_post(fields), options.caption)
    write_caption(image.path.with_suffix(".txt"), caption)
    return _row(
        candidate.id, "kept", fields,
        phash=image.phash, width=image.width, height=image.height,
        bucket=f"{image.bucket[0]}x{image.bucket[1]}", caption=caption,
        file=f"images/{image.path.name}",
        reason="animated-first-frame" if image.animated else None,
    )


def _with_trigger(caption: str, trigger: str | None) -> str:
    caption = caption.strip()
    if not trigger:
        return caption
    head = caption.split(",", 1)[0].strip()
    if head.casefold() == trigger.casefold():
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def download_and_prepare(
    client: DanbooruClient | None,
    paths: DatasetPaths,
    candidates: Sequence[Candidate],
    options: PrepareOptions = PrepareOptions(),
    on_progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Download (or read, for local files), prepare and caption each candidate in ``.staging/``.

    Returns one row per candidate: ``kept`` (provisionally: :func:`commit` still checks phash),
    ``rejected`` (bad image, with the reason) or ``failed`` (download error, with the reason). A
    candidate finished by an interrupted earlier run is re-used without a download.
    """
    paths.ensure()
    download_dir = _staging(paths, "download")
    out: list[dict[str, Any]] = []
    total = len(candidates)
    for done, candidate in enumerate(candidates, start=1):
        row = _read_pending(paths, candidate)
        if row is None:
            row = _process(client, paths, candidate, options, download_dir)
            if row["status"] != "failed":
                _write_pending(paths, row)
        out.append(row)
        if on_progress is not None:
            on_progress({
                "stage": "download", "done": done, "total": total, "id": candidate.id,
                "query": candidate.query, "status": row["status"], "reason": row.get("reason"),
            })
    return out


def _process(
    client: DanbooruClient | None,
    paths: DatasetPaths,
    candidate: Candidate,
    options: PrepareOptions,
    download_dir: Path,
) -> dict[str, Any]:
    fields = dict(candidate.fields)
    fields["attempts"] = int(fields.get("attempts") or 0) + 1
    if candidate.source_path is not None:
        return _prepare_one(paths, candidate, Path(candidate.source_path), options, fields)
    if client is None or candidate.post is None:
        raise ValueError(f"candidate {candidate.id} has neither a post to download nor a local file")
    ext = (candidate.post.file_ext or "bin").lower()
    dest = download_dir / f"{candidate.id}.{ext}"
    try:
        client.download(candidate.post, dest, md5=candidate.md5)
    except DownloadError as exc:
        reason = getattr(exc, "reason", None) or "download-failed"
        if reason.split(":", 1)[0] in FINAL_DOWNLOAD_REASONS:
            log.warning("post %s: not downloaded (%s): %s", candidate.id, reason, exc)
            return _row(candidate.id, "rejected", fields, reason=reason)
        log.info("post %s: download failed (%s)", candidate.id, reason)
        return _row(candidate.id, "failed", fields, reason=reason)
    try:
        return _prepare_one(paths, candidate, dest, options, fields)
    finally:
        try:
            dest.unlink()
        except FileNotFoundError:
            pass


def prepare_local(
    paths: DatasetPaths,
    candidates: Sequence[Candidate],
    options: PrepareOptions = PrepareOptions(),
    on_progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """:func:`download_and_prepare` for local files (``Candidate.source_path``), no client."""
    return download_and_prepare(None, paths, candidates, options, on_progress)


# --------------------------------------------------------------------------------------------
# 3. commit and 4. version
# --------------------------------------------------------------------------------------------


def _pending_version(paths: DatasetPaths, rows: Iterable[dict[str, Any]]) -> str:
    """The version the next kept rows join: an unwritten one a crash left behind, else the next."""
    written = set(list_versions(paths))
    unwritten = sorted({r["version_added"] for r in rows
                        if r["status"] == "kept" and r.get("version_added") and r["version_added"] not in written})
    return unwritten[-1] if unwritten else next_version(paths)


def _sort_key(row: dict[str, Any]) -> tuple[int, int]:
    pid = row.get("post_id")
    return (0, pid) if isinstance(pid, int) else (1, 0)


def commit(
    paths: DatasetPaths,
    rows: Sequence[dict[str, Any]],
    cursors: dict[str, QueryCursor] | None = None,
    *,
    radius: int = 4,
    group_parents: bool = False,
    queries: dict[str, str] | None = None,
    finalize: bool = True,
    lock_timeout: float = 0.0,
) -> CommitResult:
    """Deduplicate ``rows`` against the data set, move kept images in, append the manifest,
    then store the cursors (and, with ``finalize``, write the new version).

    Dedup (md5, then phash within ``radius``) is against every kept image of the data set plus
    the rows earlier in this batch (lower post ids first). Of each duplicate group the best copy
    is kept (see :mod:`lora.data.duplicates`): a better newcomer supersedes an earlier kept
    copy, whose row becomes a duplicate but keeps its file for the versions that list it. Rows
    for posts the manifest already holds with a final status are ignored, so committing twice
    is harmless.
    """
    with dataset_lock(paths, timeout=lock_timeout):
        paths.ensure()
        existing = load_rows(paths)
        final = {r["id"] for r in existing if r["status"] != "failed"}
        copies = KeptCopies(radius=radius, group_parents=group_parents)
        kept_by_id: dict[str, dict[str, Any]] = {}
        for row in existing:
            if row["status"] == "kept":
                copies.add(row)
                kept_by_id[row["id"]] = row
        existing_ids = set(kept_by_id)
        version = _pending_version(paths, existing)
        committed_at = now_utc()
        batch: list[dict[str, Any]] = []
        changed: dict[str, dict[str, Any]] = {}  # earlier rows superseded or re-pointed
        replaced: list[dict[str, Any]] = []
        recaption: set[str] = set()
        seen_ids: set[str] = set()
        for row in sorted(rows, key=_sort_key):
            if row["id"] in final or row["id"] in seen_ids:
                continue
            seen_ids.add(row["id"])
            row = dict(row)
            row["committed_at"] = committed_at
            batch.append(row)
            if row["status"] != "kept":
                continue
            found = copies.match(row)
            if found is None:
                copies.add(row)
                kept_by_id[row["id"]] = row
                continue
            kept_id, kind = found
            incumbent = kept_by_id[kept_id]
            if kind != "same-parent-as" and better_copy(row, incumbent):
                # The newcomer is the better copy: it is kept, the incumbent becomes its duplicate.
                if incumbent["id"] in existing_ids:
                    incumbent = changed.setdefault(incumbent["id"], dict(incumbent))
                    replaced.append(incumbent)
                else:
                    recaption.discard(incumbent["id"])
                _mark_duplicate(incumbent, row, duplicate_kind(incumbent, row))
                if inherit_caption(row, incumbent):
                    recaption.add(row["id"])
                del kept_by_id[kept_id]
                kept_by_id[row["id"]] = row
                copies.replace(kept_id, row)
                _repoint(kept_id, row, batch, existing, changed)
            else:
                _mark_duplicate(row, incumbent, kind)
                if incumbent["id"] not in existing_ids and inherit_caption(incumbent, row):
                    recaption.add(incumbent["id"])

        prepared = paths.staging / "prepared"
        for row in batch:
            name = Path(row.get("file") or "").name
            if row["status"] == "kept":
                if row["id"] in recaption and name and (prepared / name).exists():
                    write_caption((prepared / name).with_suffix(".txt"), row.get("caption") or "")
                if not _move_in(prepared, paths.images, name):
                    row.update(status="failed", reason="staged-file-missing", file=None)
                else:
                    row["version_added"] = version
            else:
                row["file"] = None
                if name:
                    _discard(prepared / name)
                    _discard((prepared / name).with_suffix(".txt"))

        all_rows = upsert_rows(existing, batch + list(changed.values()))
        if batch or changed:
            save_rows(paths, all_rows)
        for row in batch:
            _discard(_pending_path(paths, row["id"]))
        written = finalize_version(paths, queries=queries, rows=all_rows) if finalize else None
        if cursors:
            state = load_state(paths)
            state.queries.update(cursors)
            save_state(paths, state)
        kept_total = sum(1 for r in all_rows if r["status"] == "kept")
        return CommitResult(
            rows=batch,
            added=sum(1 for r in batch if r["status"] == "kept"),
            duplicates=sum(1 for r in batch if r["status"] == "duplicate"),
            total_kept=kept_total,
            version=written,
            replaced=replaced,
        )


def _mark_duplicate(row: dict[str, Any], kept: dict[str, Any], kind: str) -> None:
    row.update(status="duplicate", reason=f"{kind}:{kept['id']}", duplicate_of=kept["id"])


def _repoint(
    old_id: str,
    kept: dict[str, Any],
    batch: list[dict[str, Any]],
    existing: list[dict[str, Any]],
    changed: dict[str, dict[str, Any]],
) -> None:
    """Rows that named ``old_id`` as their original now name the copy that replaced it."""
    for row in batch:
        if row.get("duplicate_of") == old_id and row is not kept:
            kind = reason_kind(row.get("reason"))
            _mark_duplicate(row, kept, kind if kind == "same-parent-as" else duplicate_kind(row, kept))
    for row in existing:
        row = changed.get(row["id"], row)
        if row.get("duplicate_of") == old_id and row["id"] != kept["id"]:
            row = changed.setdefault(row["id"], dict(row))
            kind = reason_kind(row.get("reason"))
            _mark_duplicate(row, kept, kind if kind == "same-parent-as" else duplicate_kind(row, kept))


def _move_in(prepared: Path, images: Path, name: str) -> bool:
    """Move a staged image and its caption into ``images/`` (already there after a crash: fine)."""
    if not name:
        return False
    src, dest = prepared / name, images / name
    if src.exists():
        images.mkdir(parents=True, exist_ok=True)
        caption_src = src.with_suffix(".txt")
        if caption_src.exists():
            os.replace(caption_src, dest.with_suffix(".txt"))
        os.replace(src, dest)
    return dest.exists() and dest.with_suffix(".txt").exists()


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def finalize_version(
    paths: DatasetPaths,
    *,
    queries: dict[str, str] | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
) -> str | None:
    """Write the version that committed kept rows are waiting for; None when none is waiting.

    The version lists every kept file of the data set (manifest order). Call it under the
    data-set lock (``commit`` and ``recover`` do).
    """
    rows = load_rows(paths) if rows is None else rows
    written = set(list_versions(paths))
    waiting = sorted({r["version_added"] for r in rows
                      if r["status"] == "kept" and r.get("version_added") and r["version_added"] not in written})
    if not waiting:
        return None
    version = waiting[-1]
    latest = latest_version(paths)
    if latest is not None and int(version[1:]) <= int(latest[1:]):
        # Cannot happen under the lock; refuse rather than write an out-of-order version.
        raise RuntimeError(f"data set {paths.name!r}: pending version {version} is not after {latest}")
    kept = [r for r in rows if r["status"] == "kept"]
    state = load_state(paths)
    all_queries = {name: c.tags for name, c in state.queries.items()}
    all_queries.update(queries or {})
    used = {r.get("query") for r in kept}
    write_version(
        paths,
        version,
        post_ids=[r["id"] for r in kept],
        files=[r["file"] for r in kept],
        queries={k: v for k, v in sorted(all_queries.items()) if k in used} or dict(sorted(all_queries.items())),
        extra={"added": sum(1 for r in kept if r.get("version_added") == version)},
    )
    return version


def recover(paths: DatasetPaths) -> dict[str, int]:
    """Repair what a crash can leave behind (call under the data-set lock).

    - a version whose rows were committed but whose file was not written is written now;
    - image files in ``images/`` that no kept row names and no pending staged result claims
      are removed (they were never part of the data set);
    - half-finished downloads in ``.staging/download`` are removed.
    Pending results in ``.staging/rows`` stay: the next run re-uses them.
    """
    paths.ensure()
    rows = load_rows(paths)
    finalize_version(paths, rows=rows)
    # Superseded copies (duplicates that keep a file) stay: older versions list them.
    kept_files = {Path(r["file"]).name for r in rows if r.get("file")}
    final_ids = {r["id"] for r in rows if r["status"] != "failed"}
    claimed: set[str] = set()
    rows_dir = paths.staging / "rows"
    removed = {"orphans": 0, "stale_pending": 0, "downloads": 0}
    if rows_dir.is_dir():
        for pending in rows_dir.glob("*.json"):
            if pending.stem in final_ids:
                _discard(pending)  # committed already; the pending copy is stale
                removed["stale_pending"] += 1
                continue
            try:
                data = json.loads(pending.read_text())
            except (OSError, json.JSONDecodeError):
                _discard(pending)
                continue
            if data.get("file"):
                claimed.add(Path(data["file"]).name)
    claimed_stems = {Path(n).stem for n in claimed}
    kept_stems = {Path(n).stem for n in kept_files}
    for folder, names, stems in (
        (paths.images, kept_files | claimed, kept_stems | claimed_stems),
        (paths.staging / "prepared", claimed, claimed_stems),
    ):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if not path.is_file():
                continue
            wanted = path.stem in stems if path.suffix == ".txt" else path.name in names
            if not wanted:
                _discard(path)
                removed["orphans"] += 1
    download = paths.staging / "download"
    if download.is_dir():
        for path in download.iterdir():
            if path.is_file():
                _discard(path)
                removed["downloads"] += 1
    return removed


# --------------------------------------------------------------------------------------------
# Everything in one process
# --------------------------------------------------------------------------------------------


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
) -> RefreshSummary:
    """Fetch, dedup, caption and prepare new posts into ``<workspace>/datasets/<name>``.

    Without ``target_size`` one round takes up to ``limit`` new posts per query. With it, rounds
    continue (older posts) until the data set holds ``target_size`` images, the queries run
    out of posts, or ``max_rounds`` is reached. One version is written at the end if anything
    was kept. Safe to interrupt: run it again and it continues.

    ``allow_file_hosts`` are extra hosts file URLs may point to; ``max_file_size`` caps every
    download (and rejects posts declaring more); ``max_pixels`` is the decompression-bomb
    limit. ``filters``, when given, carries all of these instead.
    """
    started = time.monotonic()
    paths = DatasetPaths.of(workspace, name).ensure()
    caption_options = caption or CaptionOptions()
    if trigger_word is not None:
        caption_options = replace(caption_options, trigger_word=trigger_word)
    filters = filters or FetchFilters(ratings=tuple(ratings), min_side=min_side,
                                      file_hosts=tuple(allow_file_hosts), max_file_size=max_file_size,
                                      max_pixels=max_pixels)
    options = PrepareOptions(min_side=min_side, caption=caption_options, radius=radius,
                             group_parents=group_parents, max_pixels=filters.max_pixels)
    summary = RefreshSummary(dataset=name)
    own_client = client is None
    if own_client:
        client = make_client(booru_url, credentials, requests_per_second, backoff_base=backoff_base,
                             filters=filters)
    query_map = {q.name: q.tags for q in queries}
    try:
        with dataset_lock(paths, timeout=lock_timeout):
            recover(paths)
            used: dict[str, int] = {}
            exhausted: set[str] = set()
            for round_no in range(1, max_rounds + 1):
                known = _Known.from_rows(load_rows(paths))
                state = load_state(paths)
                exhausted |= {q.name for q in queries
                              if state.cursor(q.name, q.tags).exhausted}
                budgets = plan_budgets(queries, limit=limit, target_size=target_size,
                                       kept_now=known.kept, used=used, exhausted=exhausted)
                if not any(budgets.values()):
                    break
                collection = collect_candidates(client, paths, queries, filters=filters,
                                                credentials=credentials, budgets=budgets,
                                                retry_failed=round_no == 1)
                summary.already_seen += collection.already_seen
                exhausted |= set(collection.exhausted)
                for c in collection.candidates:
                    used[c.query] = used.get(c.query, 0) + 1
                rows = download_and_prepare(
                    client, paths, collection.candidates, options,
                    on_progress=_with_round(on_progress, round_no),
                )
                result = commit(paths, collection.rows + rows, collection.cursors, radius=radius,
                                group_parents=group_parents, queries=query_map, finalize=False)
                summary.add_rows(result.rows)
                summary.replaced += len(result.replaced)
                summary.rounds = round_no
                summary.total_kept = result.total_kept
                if target_size is None or result.total_kept >= target_size:
                    break
                if not collection.candidates:
                    break
            summary.version = finalize_version(paths, queries=query_map)
            summary.total_kept = sum(1 for r in load_rows(paths) if r["status"] == "kept")
            summary.exhausted = sorted(exhausted)
    finally:
        if own_client and client is not None:
            client.close()
    summary.elapsed_s = round(time.monotonic() - started, 3)
    return summary


def _with_round(on_progress: ProgressCallback | None, round_no: int) -> ProgressCallback | None:
    if on_progress is None:
        return None

    def report(event: dict[str, Any]) -> None:
        on_progress({**event, "round": round_no})

    return report

