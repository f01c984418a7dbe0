"""``state.json``: the fetch cursors of each named query of a data set.

Why: a refresh asks only for posts newer than what it has seen (``after_id = newest_id``), and
grows a data set by continuing older than the oldest post seen (``before_id = oldest_id``).
Cursors are a cache of what the manifest already records: they are advanced only after the rows
they cover are committed, so a crash can make a refresh re-read pages (posts already in the
manifest are skipped), never skip posts.

Layout::

    {"queries": {"sketch_aesthetic": {"tags": "sketch", "query": "sketch rating:g,s ...",
                  "newest_id": 123, "oldest_id": 45, "exhausted": false, "updated_at": ISO}},
     "updated_at": ISO}
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lora.data.manifest import DatasetPaths, now_utc
from lora.fsutil import atomic_write_json

__all__ = ["QueryCursor", "DatasetState", "StateError", "load_state", "save_state"]


class StateError(ValueError):
    """``state.json`` is malformed; the message names the file and field."""


@dataclass
class QueryCursor:
    """How far one named query has been walked.

    ``newest_id``/``oldest_id``: the highest and lowest post ids the walk has covered (every post
    in between has been seen). ``exhausted``: the walk towards older posts reached the end.
    ``query``: the full query string (tags + filters) the cursor belongs to; a cursor is reset
    when it changes, because posts it skipped may now match.
    """

    tags: str
    query: str | None = None
    newest_id: int | None = None
    oldest_id: int | None = None
    exhausted: bool = False
    updated_at: str | None = None

    def covers(self, post_id: int) -> bool:
        return (
            self.newest_id is not None
            and self.oldest_id is not None
            and self.oldest_id <= post_id <= self.newest_id
        )


@dataclass
class DatasetState:
    queries: dict[str, QueryCursor] = field(default_factory=dict)
    updated_at: str | None = None

    def cursor(self, name: str, tags: str, query: str | None = None) -> QueryCursor:
        """The cursor of ``name``; a fresh one if unknown or if its tags/query changed."""
        current = self.queries.get(name)
        if current is None or current.tags != tags or (query and current.query and current.query != query):
            return QueryCursor(tags=tags, query=query)
        return current

    def to_json(self) -> dict[str, Any]:
        return {
            "queries": {name: asdict(cursor) for name, cursor in sorted(self.queries.items())},
            "updated_at": self.updated_at,
        }


def _int_or_none(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{where} must be an integer or null, got {value!r}")
    return value


def load_state(paths: DatasetPaths) -> DatasetState:
    """The state, or an empty one when the file does not exist yet."""
    try:
        raw = json.loads(paths.state.read_text())
    except FileNotFoundError:
        return DatasetState()
    except json.JSONDecodeError as exc:
        raise StateError(f"{paths.state} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("queries", {}), dict):
        raise StateError(f"{paths.state}: expected {{\"queries\": {{name: cursor}}}}")
    queries: dict[str, QueryCursor] = {}
    for name, item in raw.get("queries", {}).items():
        where = f"{paths.state}: queries.{name}"
        if not isinstance(item, dict) or not isinstance(item.get("tags"), str):
            raise StateError(f"{where} must be an object with a 'tags' string")
        queries[name] = QueryCursor(
            tags=item["tags"],
            query=item.get("query"),
            newest_id=_int_or_none(item.get("newest_id"), f"{where}.newest_id"),
            oldest_id=_int_or_none(item.get("oldest_id"), f"{where}.oldest_id"),
            exhausted=bool(item.get("exhausted", False)),
            updated_at=item.get("updated_at"),
        )
    return DatasetState(queries=queries, updated_at=raw.get("updated_at"))


def save_state(paths: DatasetPaths, state: DatasetState) -> None:
    """Write ``state.json`` atomically."""
    state.updated_at = now_utc().isoformat(timespec="seconds")
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.state, state.to_json(), indent=1, prefix=".state.", suffix=".json.tmp")
