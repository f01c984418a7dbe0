"""The ``.staging/`` folder of a data set: downloads, prepared images and pending rows.

Why: preparing and committing are separate steps (the flow runs them as separate tasks, a
crash can fall between them). A prepared image waits in ``.staging/prepared`` with a small
JSON "pending row" in ``.staging/rows``, so a re-run re-uses finished work instead of
downloading again, and the commit step knows what is waiting.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora.data.candidates import Candidate
from lora.data.manifest import COLUMNS, DatasetPaths, new_row, now_utc
from lora.fsutil import atomic_write_bytes

__all__ = ["staging_dir", "pending_path", "write_pending", "read_pending", "discard"]


def staging_dir(folder: Path) -> Path:
    """``folder`` (one of ``DatasetPaths``' staging folders), created when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pending_path(paths: DatasetPaths, candidate_id: str) -> Path:
    return staging_dir(paths.pending_rows) / f"{candidate_id}.json"


def write_pending(paths: DatasetPaths, row: dict[str, Any]) -> None:
    atomic_write_bytes(pending_path(paths, row["id"]), json.dumps(row, default=str).encode())


def read_pending(paths: DatasetPaths, candidate: Candidate) -> dict[str, Any] | None:
    """A finished (uncommitted) result for this candidate from an earlier, interrupted run."""
    path = pending_path(paths, candidate.id)
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None  # not one of ours: prepared again
    if raw.get("md5") != candidate.md5 or raw.get("status") not in ("kept", "rejected"):
        return None
    if raw["status"] == "kept":
        name = Path(raw.get("file") or "").name
        if not name or not (
            (paths.prepared / name).exists() or (paths.images / name).exists()
        ):
            return None
    raw["seen_at"] = now_utc()
    raw["committed_at"] = None
    return new_row(raw.pop("id"), raw.pop("status"), **{k: v for k, v in raw.items() if k in COLUMNS})


def discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
