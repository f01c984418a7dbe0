"""What a refresh or import did, counted for people: kept, duplicates, rejected by reason.

Why a separate module: the CLI prints it, the Prefect flow returns it (as a dict) and turns it
into a table artifact, and ``train-lora`` reads the version and total from it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from lora.data.manifest import reason_kind

__all__ = ["RefreshSummary"]

#: Skipped entries the table shows one per line (``--json`` lists them all).
_SKIPPED_SHOWN = 20


@dataclass
class RefreshSummary:
    """Counts of one refresh (all its rounds).

    ``reasons`` maps a reason kind (``duplicate-of``, ``md5-duplicate-of``, ``deleted``,
    ``too-small`` …) to how many posts it affected; ``per_query`` maps a query name to its
    counts by status. ``already_seen`` counts posts the walk met that the manifest already had.
    ``version`` is the version this refresh wrote (None when it added nothing) and
    ``total_kept`` the number of images the data set holds afterwards.
    """

    dataset: str
    kept: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, dict[str, int]] = field(default_factory=dict)
    per_query: dict[str, dict[str, int]] = field(default_factory=dict)
    already_seen: int = 0
    version: str | None = None
    total_kept: int = 0
    rounds: int = 0
    exhausted: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Earlier kept images a better copy replaced (they stay on disk for older versions).
    replaced: int = 0
    #: Things passed over that are not manifest rows (hidden files, refused symlinks ...).
    notes: list[str] = field(default_factory=list)
    #: Files and entries not imported, ``{"path", "reason"}`` (the user's path): a caption that
    #: is not text, a metadata entry of the wrong shape or naming a missing file. They are not
    #: manifest rows, so the next run picks them up once they are fixed.
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count committed rows (each row once)."""
        reasons = Counter(self.reasons)
        for row in rows:
            status = row["status"]
            query = row.get("query") or "-"
            bucket = self.per_query.setdefault(
                query, {"kept": 0, "duplicate": 0, "rejected": 0, "failed": 0}
            )
            bucket[status] = bucket.get(status, 0) + 1
            if status == "kept":
                self.kept += 1
                continue
            if status == "duplicate":
                self.duplicates += 1
            elif status == "rejected":
                self.rejected += 1
            elif status == "failed":
                self.failed += 1
            kind = reason_kind(row.get("reason")) or status
            reasons[kind] += 1
            per_status = self.by_status.setdefault(status, {})
            per_status[kind] = per_status.get(kind, 0) + 1
        self.reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def seen(self) -> int:
        return self.kept + self.duplicates + self.rejected + self.failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seen"] = self.seen
        return data

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per outcome (kept, then each reason), for a Prefect table artifact."""
        rows: list[dict[str, Any]] = [{"outcome": "kept", "reason": "", "count": self.kept}]
        for status in ("duplicate", "rejected", "failed"):
            for reason, count in sorted(self.by_status.get(status, {}).items(), key=lambda kv: (-kv[1], kv[0])):
                rows.append({"outcome": status, "reason": reason, "count": count})
        return rows

    def format_table(self) -> str:
        """A plain-text summary for the terminal."""
        lines = [
            f"data set {self.dataset}: kept {self.kept}, duplicates {self.duplicates}, "
            f"rejected {self.rejected}, failed {self.failed}"
            + (f", already in the data set {self.already_seen}" if self.already_seen else ""),
        ]
        if self.reasons:
            width = max(len(r) for r in self.reasons)
            lines.append("  not kept, by reason:")
            lines += [f"    {reason:<{width}}  {count:>6}" for reason, count in self.reasons.items()]
        if self.per_query:
            width = max(5, *(len(q) for q in self.per_query))
            lines.append("  per query:")
            lines.append(f"    {'query':<{width}}  {'kept':>6}{'dup':>6}{'rej':>6}{'fail':>6}")
            for query, counts in sorted(self.per_query.items()):
                lines.append(
                    f"    {query:<{width}}  {counts.get('kept', 0):>6}{counts.get('duplicate', 0):>6}"
                    f"{counts.get('rejected', 0):>6}{counts.get('failed', 0):>6}"
                )
        if self.replaced:
            lines.append(f"  replaced {self.replaced} earlier image(s) with a better copy (lossless, "
                         "larger or captioned); older versions keep theirs")
        if self.exhausted:
            lines.append(f"  no older posts left for: {', '.join(sorted(self.exhausted))}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} (not imported; fix and run again):")
            lines += [f"    {s['path']}: {s['reason']}" for s in self.skipped[:_SKIPPED_SHOWN]]
            if len(self.skipped) > _SKIPPED_SHOWN:
                lines.append(f"    ... and {len(self.skipped) - _SKIPPED_SHOWN} more (--json lists all)")
        lines.append(
            f"  version: {self.version or 'none (nothing new kept)'}; "
            f"the data set holds {self.total_kept} images"
        )
        return "\n".join(lines)

