"""What a refresh step hands to the next: candidates (posts or files to prepare), their manifest
fields, and what the data set already holds.

Why its own module: collecting, preparing, committing and importing all build rows the same
way; keeping the shared shapes here lets each of those modules do one job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from lora.booru import Post
from lora.data.manifest import new_row

__all__ = ["Candidate", "KnownRows", "post_fields", "make_row"]


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


def make_row(candidate_id: str, status: str, fields: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A complete manifest row: the candidate's fields so far plus its outcome (status, reason …)."""
    merged = {**fields, **more}
    return new_row(candidate_id, status, **merged)


@dataclass
class KnownRows:
    """What the data set already holds, for skipping and exact dedup."""

    final_ids: set[str]
    kept_md5: dict[str, str]
    kept: int
    retry: dict[str, dict[str, Any]]

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], max_attempts: int = 3) -> "KnownRows":
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
