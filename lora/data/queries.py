"""The named queries of a data set and how many new posts each may take in one run.

Why its own module: the CLI, the flow and the refresh orchestration all parse queries the same
way (``NAME=TAGS`` / ``NAME:LIMIT=TAGS``) and share one budget rule, so a refresh grows every
query evenly towards a target size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["QuerySpec", "parse_query_spec", "make_query_specs", "plan_budgets"]


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
