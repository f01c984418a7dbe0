"""Steps 3 and 4 of a refresh: commit prepared rows into the data set, write the version, and
repair what a crash left behind.

The manifest (and the files it names) is the truth; versions and cursors are derived from it
and are repaired by :func:`recover` when a crash left them behind. Of each duplicate group the
best copy is kept (:mod:`lora.data.duplicates`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lora.data.captions import write_caption
from lora.data.duplicates import KeptCopies, better_copy, duplicate_kind, inherit_caption
from lora.data.manifest import (
    DatasetPaths,
    dataset_lock,
    load_rows,
    now_utc,
    reason_kind,
    save_rows,
    upsert_rows,
)
from lora.data.staging import discard, pending_path
from lora.data.state import QueryCursor, load_state, save_state
from lora.data.versions import (
    VersionError,
    latest_version,
    list_versions,
    next_version,
    read_version,
    write_version,
)

__all__ = ["CommitResult", "commit", "drop_missing_files", "finalize_version", "recover", "version_change",
           "write_kept_version"]

log = logging.getLogger(__name__)

#: Reason of a kept row whose image was found missing (deleted by hand) when a version was due.
FILE_MISSING = "file-missing"


@dataclass
class CommitResult:
    """What one commit wrote. ``replaced``: earlier kept rows a better copy superseded."""

    rows: list[dict[str, Any]]
    added: int
    duplicates: int
    total_kept: int
    version: str | None
    replaced: list[dict[str, Any]] = field(default_factory=list)


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

        prepared = paths.prepared
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
                    discard(prepared / name)
                    discard((prepared / name).with_suffix(".txt"))

        all_rows = upsert_rows(existing, batch + list(changed.values()))
        if batch or changed:
            save_rows(paths, all_rows)
        for row in batch:
            discard(pending_path(paths, row["id"]))
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


def drop_missing_files(paths: DatasetPaths, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark kept rows whose image is gone (deleted by hand) as removed, reason ``file-missing``,
    and save the manifest; returns them. ``rows`` is updated in place.

    Why: a version must never list a file that is not there (training refuses such a version),
    and the row says what happened instead of the image silently vanishing. Call it under the
    data-set lock."""
    dropped = []
    for i, row in enumerate(rows):
        if row["status"] == "kept" and not (paths.root / row["file"]).is_file():
            rows[i] = dict(row, status="removed", reason=FILE_MISSING)
            dropped.append(rows[i])
    if dropped:
        save_rows(paths, rows)
        log.warning("data set %s: %d kept image(s) missing from images/ (deleted by hand?) are left out "
                    "of the new version and marked removed (%s): %s", paths.name, len(dropped), FILE_MISSING,
                    ", ".join(r["file"] for r in dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    return dropped


def finalize_version(
    paths: DatasetPaths,
    *,
    queries: dict[str, str] | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> str | None:
    """Write the version that committed kept rows are waiting for, or a new one when kept
    images were deleted by hand; None when neither.

    The version lists every kept file of the data set (manifest order) that is there: a kept
    image deleted by hand is marked removed first (:func:`drop_missing_files`), and a version
    is written without it even when nothing was added, so the next fetch or import mends a
    data set that a hand deletion left untrainable. Call it under the data-set lock
    (``commit`` and ``recover`` do).
    """
    rows = load_rows(paths) if rows is None else rows
    dropped = drop_missing_files(paths, rows)
    written = set(list_versions(paths))
    waiting = sorted({r["version_added"] for r in rows
                      if r["status"] == "kept" and r.get("version_added") and r["version_added"] not in written})
    if not waiting and not dropped:
        return None
    changes = [version_change(r, f"removed ({FILE_MISSING})") for r in dropped]
    if not waiting:
        version = next_version(paths)
        write_kept_version(paths, version, rows, queries=queries,
                           extra={"added": 0, "reason": FILE_MISSING, "changes": changes})
        return version
    version = waiting[-1]
    latest = latest_version(paths)
    if latest is not None and int(version[1:]) <= int(latest[1:]):
        # Cannot happen under the lock; refuse rather than write an out-of-order version.
        raise RuntimeError(f"data set {paths.name!r}: pending version {version} is not after {latest}")
    added = sum(1 for r in rows if r["status"] == "kept" and r.get("version_added") == version)
    write_kept_version(paths, version, rows, queries=queries,
                       extra={"added": added, **({"changes": changes} if changes else {})})
    return version


def version_change(row: dict[str, Any], change: str) -> dict[str, str]:
    """One entry of a version's ``changes``: what happened to an image since the last version."""
    return {"id": row["id"], "file": row.get("file") or "", "change": change}


def write_kept_version(
    paths: DatasetPaths,
    version: str,
    rows: Sequence[dict[str, Any]],
    *,
    queries: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``version`` listing the kept rows (manifest order): the one place a version is
    made from the manifest (commits, repairs, removals). Its queries are those of the kept
    images, named by the fetch cursors, the previous version or ``queries``."""
    kept = [r for r in rows if r["status"] == "kept"]
    all_queries = _previous_queries(paths)
    all_queries.update({name: c.tags for name, c in load_state(paths).queries.items()})
    all_queries.update(queries or {})
    used = {r.get("query") for r in kept}
    return write_version(
        paths,
        version,
        post_ids=[r["id"] for r in kept],
        files=[r["file"] for r in kept],
        queries={k: v for k, v in sorted(all_queries.items()) if k in used} or dict(sorted(all_queries.items())),
        extra=extra,
    )


def _previous_queries(paths: DatasetPaths) -> dict[str, str]:
    """The latest readable version's queries (an import's ``local:`` queries live only there)."""
    for name in reversed(list_versions(paths)):
        try:
            queries = read_version(paths, name).get("queries")
        except VersionError:
            continue
        if isinstance(queries, dict):
            return {str(k): str(v) for k, v in queries.items()}
    return {}


def _wanted(path: Path, names: set[str], stems: set[str]) -> bool:
    """Whether ``path`` is a file a row names (a caption by its image's stem)."""
    return path.stem in stems if path.suffix == ".txt" else path.name in names


def recover(paths: DatasetPaths) -> dict[str, int]:
    """Repair what a crash can leave behind (call under the data-set lock).

    - a version whose rows were committed but whose file was not written is written now;
    - prepared files in ``.staging/prepared`` that no pending staged result claims are removed;
      files in ``images/`` that no row names are left alone and counted (``unlisted_kept``):
      the project cannot prove it put them there;
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
    rows_dir = paths.pending_rows
    removed = {"orphans": 0, "stale_pending": 0, "downloads": 0}
    if rows_dir.is_dir():
        for pending in rows_dir.glob("*.json"):
            if pending.stem in final_ids:
                discard(pending)  # committed already; the pending copy is stale
                removed["stale_pending"] += 1
                continue
            try:
                data = json.loads(pending.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                data = None
            if not isinstance(data, dict):
                discard(pending)  # not a pending row (damaged): the candidate is prepared again
                continue
            if isinstance(data.get("file"), str) and data["file"]:
                claimed.add(Path(data["file"]).name)
    claimed_stems = {Path(n).stem for n in claimed}
    kept_stems = {Path(n).stem for n in kept_files}
    prepared = paths.prepared  # the project's own staging: leftovers are its own
    if prepared.is_dir():
        for path in prepared.iterdir():
            if path.is_file() and not _wanted(path, claimed, claimed_stems):
                discard(path)
                removed["orphans"] += 1
    # images/ is the user's to look into and edit: a file no row names is left where it is
    # (lora/owned.py's rule: never delete what the project cannot prove it wrote). It is not
    # part of any version; `animelora dataset check` lists it.
    if paths.images.is_dir():
        stray = sorted(p.name for p in paths.images.iterdir()
                       if p.is_file() and not _wanted(p, kept_files | claimed, kept_stems | claimed_stems))
        if stray:
            log.warning("%s: %d file(s) no manifest row names (%s%s): left as they are, in no version",
                        paths.images, len(stray), ", ".join(stray[:3]), " ..." if len(stray) > 3 else "")
        removed["unlisted_kept"] = len(stray)
    download = paths.downloads
    if download.is_dir():
        for path in download.iterdir():
            if path.is_file():
                discard(path)
                removed["downloads"] += 1
    return removed
