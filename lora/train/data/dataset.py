"""Reading a training data set and holding out a validation split.

Two layouts (docs/architecture.md): a data-set folder with ``versions/vNNNN.json`` (the latest
version, or the one pinned by the config, lists ``files``), or a plain folder of images with
``.txt`` captions beside them. The held-out images belong to the data set, not to the run
(lora/data/split.py): every run, whatever its seed or preset, and every version hold out the
same images, so runs can be compared on them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lora.data import split as data_split
from lora.data import versions as data_versions
from lora.data.manifest import DatasetPaths, manifest_splits

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
        path = DatasetPaths(root).version_file(resolved)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = data["files"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: not a data-set version file ({exc.__class__.__name__}: {exc})") from None
        try:  # every listed path inside the data set, before anything is read
            data_versions.check_files(path, root, files)
        except data_versions.VersionError as exc:
            raise DatasetError(str(exc)) from None
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


@dataclass(frozen=True)
class Split:
    """A run's view of the data set's held-out split.

    ``held_out``: every image of the version that the data set holds out (never trained on);
    ``validation``: the ones this run scores (all of them, or the first ``validation_max`` by
    the data set's rank); ``train``: the rest.
    """

    train: list[Item]
    validation: list[Item]
    held_out: list[Item]


def dataset_sides(root: Path | str, items: list[Item], fraction: float | None = None) -> dict[str, str]:
    """``{item name: "validation"|"train"}`` from the data set (lora/data/split.py).

    A data set with a manifest answers from its ``split`` column; images a version lists but
    the manifest does not keep, and folders without a manifest, from ``split.json`` (written
    with the data set's versions). Training only reads: what no file records is computed in
    memory by the same rule, with a fixed salt where the data set has none.
    """
    root = Path(root)
    names = [i.name for i in items]
    sides = manifest_splits(root) or {}
    missing = [n for n in names if n not in sides]
    if missing:
        sides = {**sides, **data_split.folder_splits(root, missing, fraction, record=False)}
    return {n: sides[n] for n in names}


def split_items(root: Path | str, items: list[Item], *, fraction: float | None = None,
                limit: int | None = None) -> Split:
    """The run's split: the data set's held-out images, of which at most ``limit`` are scored."""
    sides = dataset_sides(root, items, fraction)
    held = [i for i in items if sides[i.name] == data_split.VALIDATION]
    salt = data_split.load_settings(Path(root), fraction, create=False).salt
    scored = sorted(held, key=lambda i: data_split.rank(salt, i.name))
    if limit is not None:
        scored = scored[:max(0, limit)]
    chosen = {i.name for i in scored}
    held_names = {i.name for i in held}
    return Split(train=[i for i in items if i.name not in held_names],
                 validation=[i for i in items if i.name in chosen], held_out=held)


def recorded_split(items: list[Item], held_out: list[str] | None, validation: list[str]) -> Split:
    """The split a run recorded in its ``config.json`` (read back on resume, never recomputed).

    Runs made before the data set owned the split recorded only ``validation_images``: those
    were their held-out images, and everything else trained.
    """
    held = set(validation) if held_out is None else set(held_out) | set(validation)
    val = set(validation)
    return Split(train=[i for i in items if i.name not in held],
                 validation=[i for i in items if i.name in val],
                 held_out=[i for i in items if i.name in held])
