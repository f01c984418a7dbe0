"""The data set's ``manifest.parquet`` (one row per post ever seen) and its writer's lock.

The folder's names are :class:`lora.datapaths.DatasetPaths`'s (re-exported here).

Why: the manifest (plus the image files it names) is the single source of truth of a data set.
Cursors (``state.json``) and versions (``versions/*.json``) are derived from it and may lag
behind after a crash; the manifest never lags behind the images it lists, because images are
moved into ``images/`` before the rows naming them are written, and every write is atomic
(temporary file in the same folder, then ``os.replace``).

Rows are plain dicts with the keys of :data:`SCHEMA`; ``id`` is a string (a Danbooru post id
such as ``"123"``, or a stable ``local-<md5>`` id for imported files).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lora.data.split import SPLITS, fill_manifest_splits, load_settings
from lora.datapaths import DatasetPaths
from lora.fsutil import atomic_write

__all__ = [
    "SCHEMA",
    "COLUMNS",
    "STATUSES",
    "DatasetPaths",
    "DatasetBusyError",
    "ManifestError",
    "dataset_lock",
    "load_rows",
    "load_manifest",
    "save_rows",
    "upsert_rows",
    "new_row",
    "now_utc",
    "reason_kind",
    "leaves_folder",
]

#: The statuses a row can have. "failed" rows (download errors) may be retried by a later refresh.
#: "removed": an image taken out of the data set after it was kept (``animelora dataset remove``,
#: or its file found missing); its file, if still there, stays for the versions that list it, and
#: a refresh does not fetch it again until ``animelora dataset restore``.
STATUSES = ("kept", "duplicate", "rejected", "failed", "removed")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("post_id", pa.int64()),
        pa.field("query", pa.string()),
        pa.field("md5", pa.string()),
        pa.field("phash", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("bucket", pa.string()),
        pa.field("rating", pa.string()),
        pa.field("score", pa.int64()),
        pa.field("file_ext", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("tags_general", pa.string()),
        pa.field("tags_character", pa.string()),
        pa.field("tags_copyright", pa.string()),
        pa.field("tags_artist", pa.string()),
        pa.field("tags_meta", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
        pa.field("file_url", pa.string()),
        pa.field("parent_id", pa.int64()),
        pa.field("file", pa.string()),
        pa.field("version_added", pa.string()),
        pa.field("split", pa.string()),  # "validation" | "train": lora/data/split.py
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("attempts", pa.int64()),
        pa.field("seen_at", pa.timestamp("us", tz="UTC")),
        pa.field("committed_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


class ManifestError(ValueError):
    """A manifest row or file that breaks the schema; the message names the field or file."""


class DatasetBusyError(RuntimeError):
    """Another process is refreshing or importing into the same data set."""


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def reason_kind(reason: str | None) -> str:
    """``"duplicate-of:123"`` → ``"duplicate-of"``: the reason without the post it names."""
    return (reason or "").split(":", 1)[0]


# --------------------------------------------------------------------------------------------
# Locking: one writer per data set. Re-entrant inside a process (a Prefect flow holds it while
# its tasks, in worker threads, commit), exclusive between processes. The OS lock comes from
# ``filelock`` (flock on POSIX, msvcrt on Windows), so fetch/import/train also start on native
# Windows; the in-process count below is ours because filelock's own re-entrancy is per thread.
# --------------------------------------------------------------------------------------------

_LOCKS: dict[Path, list[Any]] = {}  # path -> [FileLock, holders]
_LOCKS_GUARD = threading.Lock()


@contextmanager
def dataset_lock(paths: DatasetPaths, timeout: float = 0.0) -> Iterator[None]:
    """Hold the data set's write lock; raise :class:`DatasetBusyError` after ``timeout`` seconds."""
    paths.root.mkdir(parents=True, exist_ok=True)
    key = paths.lock_file
    with _LOCKS_GUARD:
        entry = _LOCKS.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        from filelock import FileLock, Timeout

        lock = FileLock(key, thread_local=False)
        try:
            lock.acquire(timeout=max(0.0, timeout), poll_interval=0.2)
        except Timeout:
            raise DatasetBusyError(
                f"data set {paths.name!r} is being written by another process "
                f"(lock {key}); wait for it to finish"
            ) from None
        with _LOCKS_GUARD:
            _LOCKS[key] = [lock, 1]
    try:
        yield
    finally:
        with _LOCKS_GUARD:
            entry = _LOCKS[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _LOCKS[key]
                entry[0].release()


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def new_row(id: str, status: str, **fields: Any) -> dict[str, Any]:
    """A complete row (every column present, unknown fields refused)."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ManifestError(f"unknown manifest field(s): {', '.join(sorted(unknown))}")
    row: dict[str, Any] = {name: None for name in COLUMNS}
    row.update(fields)
    row["id"] = str(id)
    row["status"] = status
    row.setdefault("seen_at", None)
    if row["seen_at"] is None:
        row["seen_at"] = now_utc()
    _check_row(row)
    return row


def _check_row(row: dict[str, Any]) -> None:
    if not row.get("id"):
        raise ManifestError("manifest row without an id")
    if row.get("status") not in STATUSES:
        raise ManifestError(
            f"manifest row {row.get('id')!r}: status {row.get('status')!r} is not one of {STATUSES}"
        )
    if row["status"] == "kept" and not row.get("file"):
        raise ManifestError(f"manifest row {row['id']!r} is kept but names no file")
    _check_file(row, where="manifest")


def leaves_folder(rel: str) -> bool:
    """An absolute path (POSIX or Windows spelling, drive letters too) or one with ``..``:
    a name from a file (a version, the manifest, metadata.json) that could lead out of its
    folder."""
    return any(p.is_absolute() or p.anchor or ".." in p.parts for p in (PurePosixPath(rel), PureWindowsPath(rel)))


def _check_file(row: dict[str, Any], where: str) -> None:
    """A row's ``file`` must be a path inside the data set (training and every step read it)."""
    file = row.get("file")
    if file is not None and (not isinstance(file, str) or leaves_folder(file)):
        raise ManifestError(f"{where}: row {row.get('id')!r} names file {file!r} outside the data set "
                            "(files are relative to, and inside, the data-set folder)")


def load_rows(paths: DatasetPaths) -> list[dict[str, Any]]:
    """All rows, in insertion order ([] when the data set has no manifest yet).

    Columns added to the schema after a manifest was written read as None.
    """
    if not paths.manifest.exists():
        return []
    try:
        table = pq.read_table(paths.manifest)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{paths.manifest} cannot be read: {exc}") from exc
    missing = [name for name in ("id", "status") if name not in table.column_names]
    if missing:
        raise ManifestError(f"{paths.manifest} lacks required column(s) {missing}")
    rows = table.to_pylist()
    for row in rows:
        for name in COLUMNS:
            row.setdefault(name, None)
        _check_file(row, where=str(paths.manifest))
    return rows


def load_manifest(paths: DatasetPaths):
    """The manifest as a pandas DataFrame (empty, with every column, when there is none)."""
    rows = load_rows(paths)
    return pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows], schema=SCHEMA).to_pandas()


def save_rows(paths: DatasetPaths, rows: Iterable[dict[str, Any]]) -> None:
    """Write the whole manifest atomically (temporary file in the same folder, then replace).

    Kept rows without a held-out side get one here, so every writer records the split."""
    rows = list(rows)
    _record_splits(paths, rows)
    seen: set[str] = set()
    for row in rows:
        _check_row(row)
        if row["id"] in seen:
            raise ManifestError(f"manifest would hold post {row['id']!r} twice")
        seen.add(row["id"])
    try:
        table = pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows], schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"manifest rows do not fit the schema: {exc}") from exc
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.manifest, lambda tmp: pq.write_table(table, str(tmp)),
                 prefix=".manifest.", suffix=".parquet.tmp")


def _record_splits(paths: DatasetPaths, rows: list[dict[str, Any]]) -> None:
    if any(r.get("status") == "kept" and not r.get("split") for r in rows):
        paths.root.mkdir(parents=True, exist_ok=True)
        fill_manifest_splits(rows, load_settings(paths.root))


def upsert_rows(
    existing: list[dict[str, Any]], new: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``existing`` with ``new`` rows appended; a new row replaces an old row with the same id
    (that is how a retried "failed" post gets its final status), keeping the old position."""
    out = list(existing)
    index = {row["id"]: i for i, row in enumerate(out)}
    for row in new:
        i = index.get(row["id"])
        if i is None:
            index[row["id"]] = len(out)
            out.append(row)
        else:
            out[i] = row
    return out


def manifest_splits(root: Path | str) -> dict[str, str] | None:
    """``{file: side}`` of the kept rows of a data set's manifest, or None without a manifest.

    Rows without a recorded side (a manifest written before the column existed) are assigned
    in memory by the same rule a refresh records them with.
    """
    paths = DatasetPaths(Path(root))
    if not paths.manifest.exists():
        return None
    rows = load_rows(paths)
    if any(r.get("status") == "kept" and r.get("split") not in SPLITS for r in rows):
        # read only: the next refresh or import records the sides (with the data set's salt)
        fill_manifest_splits(rows, load_settings(paths.root, create=False))
    return {r["file"]: r["split"] for r in rows if r.get("status") == "kept" and r.get("file")}
