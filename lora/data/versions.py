"""Data-set versions: ``versions/vNNNN.json``, immutable snapshots of the kept files.

Why: a training run pins a version, so the data it saw can be reproduced after later refreshes
add images. A version file is written once and never changed; the latest version is the highest
name. The contract (docs/architecture.md)::

    {"version": "v0002", "parent": "v0001", "created_at": ISO8601, "queries": {name: tags},
     "post_ids": [...], "files": ["images/123.png", ...], "count": N}

``files`` are relative to the data-set folder; captions are the same stem with ``.txt``.
A version is read only after every file it lists is checked to stay inside the data set
(:func:`check_files`): a hand-edited or hostile ``../../etc/passwd`` is refused with one line
naming the version file and the entry, before anything is read or trained.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from lora.data.manifest import DatasetPaths, leaves_folder, now_utc
from lora.fsutil import atomic_write_json

__all__ = [
    "VersionError",
    "version_name",
    "list_versions",
    "latest_version",
    "next_version",
    "read_version",
    "write_version",
    "version_files",
    "check_files",
    "leaves_folder",
]

_VERSION_RE = re.compile(r"^v(\d{4,})$")


class VersionError(ValueError):
    """A version name or file that is missing or malformed; the message names it."""


def version_name(number: int) -> str:
    if number < 1:
        raise VersionError(f"version numbers start at 1, got {number}")
    return f"v{number:04d}"


def _number(name: str) -> int:
    match = _VERSION_RE.match(name)
    if not match:
        raise VersionError(f"{name!r} is not a version name like 'v0001'")
    return int(match.group(1))


def list_versions(paths: DatasetPaths) -> list[str]:
    """Version names, oldest first (temporary files ignored)."""
    if not paths.versions.is_dir():
        return []
    names = [p.stem for p in paths.versions.glob("v*.json") if _VERSION_RE.match(p.stem)]
    return sorted(names, key=_number)


def latest_version(paths: DatasetPaths) -> str | None:
    names = list_versions(paths)
    return names[-1] if names else None


def next_version(paths: DatasetPaths) -> str:
    latest = latest_version(paths)
    return version_name(_number(latest) + 1 if latest else 1)


def read_version(paths: DatasetPaths, version: str | None = None) -> dict[str, Any]:
    """The version's JSON (the latest when ``version`` is None), its ``files`` checked."""
    version = version or latest_version(paths)
    if version is None:
        raise VersionError(f"data set {paths.name!r} has no versions yet")
    _number(version)
    path = paths.versions / f"{version}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VersionError(f"data set {paths.name!r} has no version {version!r} ({path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VersionError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise VersionError(f"{path}: not a data-set version (expected a JSON object)")
    check_files(path, paths.root, data.get("files"))
    return data


def check_files(version_file: Path, root: Path, files: Any) -> list[str]:
    """``files`` of a version if each is a path inside the data-set folder ``root``; else a
    VersionError naming ``version_file`` and the entry. Symlinks are followed: an entry that
    resolves out of the data set is refused like a ``..`` (training would read it)."""
    if not isinstance(files, list):
        raise VersionError(f"{version_file}: 'files' must be a list of paths")
    real_root = os.path.realpath(root)
    for i, rel in enumerate(files):
        if not isinstance(rel, str) or not rel.strip():
            raise VersionError(f"{version_file}: files[{i}] {rel!r} is not a path")
        real = os.path.realpath(os.path.join(real_root, rel))
        if leaves_folder(rel) or os.path.commonpath([real_root, real]) != real_root:
            raise VersionError(f"{version_file}: files[{i}] {rel!r} lies outside the data set {root} "
                               "(a version lists files relative to, and inside, its data-set folder)")
    return files


def version_files(paths: DatasetPaths, version: str | None = None) -> list[Path]:
    """Absolute image paths of a version, in its order."""
    return [paths.root / rel for rel in read_version(paths, version)["files"]]


def _id_for_json(post_id: str) -> int | str:
    """Danbooru ids are written as numbers, local import ids as strings."""
    return int(post_id) if post_id.isdigit() else post_id


def write_version(
    paths: DatasetPaths,
    version: str,
    post_ids: Sequence[str],
    files: Sequence[str],
    queries: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``versions/<version>.json`` once; an existing version is never overwritten."""
    number = _number(version)
    if len(post_ids) != len(files):
        raise VersionError(f"version {version}: {len(post_ids)} post ids but {len(files)} files")
    check_files(paths.versions / f"{version}.json", paths.root, list(files))
    paths.versions.mkdir(parents=True, exist_ok=True)
    target = paths.versions / f"{version}.json"
    if target.exists():
        raise VersionError(f"version {version} of data set {paths.name!r} already exists ({target})")
    earlier = [v for v in list_versions(paths) if _number(v) < number]
    data: dict[str, Any] = {
        "version": version,
        "parent": earlier[-1] if earlier else None,
        "created_at": now_utc().isoformat(timespec="seconds"),
        "dataset": paths.name,
        "queries": dict(queries),
        "post_ids": [_id_for_json(str(p)) for p in post_ids],
        "files": list(files),
        "count": len(files),
    }
    if extra:
        data.update({k: v for k, v in extra.items() if k not in data})
    if not paths.manifest.exists():  # a manifest records its split itself (lora/data/manifest.py)
        from lora.data.split import folder_splits

        # the held-out side of each new image, recorded once, before the version that lists it
        folder_splits(paths.root, list(files))
    try:
        # exclusive: two writers cannot both create a version (os.link refuses to replace).
        atomic_write_json(target, data, indent=1, prefix=f".{version}.", suffix=".tmp", exclusive=True)
    except FileExistsError:
        raise VersionError(f"version {version} of data set {paths.name!r} already exists ({target})") from None
    return data
