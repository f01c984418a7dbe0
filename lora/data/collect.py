"""Step 1 of a refresh: walk each query's cursor and choose the posts to download.

Posts that need no download (deleted, banned, videos, too large, malformed, exact md5
duplicates of the data set …) become rows at once; the others become candidates. Cursors are
returned, not saved: the commit step saves them together with the rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from lora.booru import (
    Credentials,
    DanbooruClient,
    MalformedPost,
    Post,
    build_query,
    normalize_host,
    skip_reason,
)
from lora.data.candidates import Candidate, KnownRows, make_row, post_fields
from lora.data.images import DEFAULT_MAX_PIXELS
from lora.data.manifest import DatasetPaths, load_rows, now_utc
from lora.data.queries import QuerySpec, plan_budgets
from lora.data.state import QueryCursor, load_state

__all__ = [
    "DEFAULT_BOORU_URL",
    "DEFAULT_MAX_FILE_SIZE",
    "IMAGE_EXTS",
    "FetchFilters",
    "Collection",
    "make_client",
    "collect_candidates",
]

log = logging.getLogger(__name__)

DEFAULT_BOORU_URL = "https://danbooru.donmai.us"


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "avif", "bmp")


DEFAULT_MAX_FILE_SIZE = 50 * 1024 * 1024


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
    #: Seconds one file's download may take in all (None: from its size, see
    #: DanbooruClient.deadline_for); a file over it is recorded as failed and retried later.
    file_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_file_size <= 0:
            raise ValueError(f"max_file_size must be positive, got {self.max_file_size}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.file_timeout_s is not None and not self.file_timeout_s > 0:
            raise ValueError(f"file_timeout_s must be positive seconds, got {self.file_timeout_s}")
        object.__setattr__(self, "file_hosts", tuple(normalize_host(h) for h in self.file_hosts))


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
    ``filters`` sets its download limits (allowed file hosts, the size cap, the per-file
    deadline)."""
    filters = filters or FetchFilters()
    return DanbooruClient(
        booru_url,
        credentials=credentials,
        user_agent=user_agent,
        requests_per_second=requests_per_second,
        backoff_base=backoff_base,
        file_hosts=filters.file_hosts,
        max_download_bytes=filters.max_file_size,
        file_deadline=filters.file_timeout_s,
    )


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
    known = KnownRows.from_rows(rows)
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
            out.rows.append(make_row(bad.key, "rejected", {"post_id": bad.post_id, "query": query},
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
                    out.rows.append(make_row(pid, "rejected", fields, reason=reason))
                    continue
                md5 = post.md5
                original = known.kept_md5.get(md5)
                if original:
                    out.rows.append(make_row(pid, "duplicate", fields,
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
                    out.rows.append(make_row(pid, "duplicate", fields,
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
