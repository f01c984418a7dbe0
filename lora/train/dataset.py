"""Reading a training data set and holding out a validation split.

Two layouts (docs/architecture.md): a data-set folder with ``versions/vNNNN.json`` (the latest
version, or the one pinned by the config, lists ``files``), or a plain folder of images with
``.txt`` captions beside them. The split is a pure function of (seed, file name), so every
segment of a run, and every run with the same seed, holds out the same images.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lora.data import versions as data_versions
from lora.data.manifest import DatasetPaths

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Version label used for plain folders (no versions/ folder).
PLAIN_FOLDER_VERSION = "folder"


class DatasetError(ValueError):
    """A data set that cannot be trained on; the message names the folder or file."""


@dataclass(frozen=True)
class Item:
    """One training image: ``name`` is its path relative to the data-set folder (stable id)."""

    name: str
    image: Path
    caption: str


def _read_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    try:
        return " ".join(txt.read_text(encoding="utf-8").split())
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read caption {txt}: {exc}") from None


def list_versions(dataset_dir: Path) -> list[str]:
    """The folder's version names, oldest first, by the data-set layer's own naming rule."""
    return data_versions.list_versions(DatasetPaths(Path(dataset_dir)))


def resolve_version(dataset_dir: Path, version: str | None) -> str:
    """The version to train on: the pinned one, else the latest, else the plain-folder label."""
    versions = list_versions(dataset_dir)
    if version and version != PLAIN_FOLDER_VERSION:
        if version not in versions:
            raise DatasetError(
                f"dataset_version: {dataset_dir} has no version {version!r} "
                f"(has: {', '.join(versions) or 'none'})"
            )
        return version
    return versions[-1] if versions else PLAIN_FOLDER_VERSION


def read_dataset(dataset_dir: Path | str, version: str | None = None) -> tuple[str, list[Item]]:
    """``(version, items)`` sorted by name. Raises :class:`DatasetError` when nothing is usable."""
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset: no such folder: {root}")
    resolved = resolve_version(root, version)
    items: list[Item] = []
    if resolved != PLAIN_FOLDER_VERSION:
        path = root / "versions" / f"{resolved}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = data["files"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: not a data-set version file ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(files, list):
            raise DatasetError(f"{path}: 'files' must be a list of paths")
        for rel in files:
            image = root / str(rel)
            if not image.is_file():
                raise DatasetError(f"{path}: listed file {rel} does not exist in {root}")
            items.append(Item(Path(rel).as_posix(), image, _read_caption(image)))
    else:
        for image in sorted(root.rglob("*")):
            if image.suffix.lower() not in IMAGE_SUFFIXES or not image.is_file():
                continue
            if any(part.startswith(".") or part == "cache" for part in image.relative_to(root).parts[:-1]):
                continue
            if not image.with_suffix(".txt").is_file():
                continue
            items.append(Item(image.relative_to(root).as_posix(), image, _read_caption(image)))
    if not items:
        raise DatasetError(
            f"dataset: {root} has no training images (expected versions/vNNNN.json or images with .txt captions)"
        )
    missing = [i.name for i in items if not i.caption]
    if missing:
        log.warning("%d image(s) have no caption (e.g. %s); training them with an empty caption",
                    len(missing), missing[0])
    items.sort(key=lambda i: i.name)
    return resolved, items


def validation_size(n: int, fraction: float, count: int | None, cap: int) -> int:
    """How many images to hold out: an explicit count, else ``fraction`` (min 1 from 5 images)."""
    if n < 2:
        return 0
    if count is not None:
        k = count
    elif n < 5 or fraction <= 0:
        k = 0
    else:
        k = max(1, min(cap, round(n * fraction)))
    return max(0, min(k, n - 1))  # at least one training image always


def split_validation(
    items: list[Item], seed: int, fraction: float, count: int | None = None, cap: int = 50
) -> tuple[list[Item], list[Item]]:
    """``(train, validation)``: the held-out images are the first by sha256(seed, name)."""
    k = validation_size(len(items), fraction, count, cap)
    ranked = sorted(items, key=lambda i: hashlib.sha256(f"{seed}:{i.name}".encode()).hexdigest())
    held = {i.name for i in ranked[:k]}
    train = [i for i in items if i.name not in held]
    val = [i for i in items if i.name in held]
    return train, val
