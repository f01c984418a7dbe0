"""The held-out split of a data set: which images no run may ever train on.

Why it belongs to the data set and not to a run: two runs can only be compared fairly on images
neither of them trained on. When each run picked its own held-out images (from its seed), two
seeds of one recipe validated on different images, and a data set grown from v1 to v2 could
train on an image that v1's runs had held out. So the split is chosen once per image:

- ``split.json`` in the data-set folder holds a random ``salt`` (created once) and the held-out
  ``fraction`` (default 0.1). The rank of an image is ``sha256(salt:id)``: stable, and not
  correlated with post ids or with the split of any other data set.
- Images are assigned in *batches* (the rows a refresh or import commits together; for old
  manifests, the rows of one ``version_added``): each batch adds as many held-out images as keep
  the held-out share of the whole at ``fraction`` (at least one from 5 images on), taking the
  batch's lowest ranks. So a grown data set adds new images to the held-out set at the same
  rate, and an image, once assigned, keeps its side for good: a held-out image never moves into
  training.
- Where it is recorded: a data set with a ``manifest.parquet`` keeps it in the manifest's
  ``split`` column, written when rows are added (``manifest.save_rows`` calls
  :func:`fill_manifest_splits`). A folder without a manifest (a plain folder of images, or a
  generated one with only ``versions/``) keeps its assignments by image path in ``split.json``,
  written the first time a run reads a new image.

Old manifests without the column still load: their rows are assigned batch by batch in the
order of ``version_added``, which gives the same answer whether a run computes it (in memory)
or a later refresh records it. Runs made before the split belonged to the data set keep their
own held-out list (``config.json``'s ``validation_images``) when they resume (lora/train/data/plan.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lora.datapaths import SPLIT_FILE, DatasetPaths
from lora.fsutil import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.1
VALIDATION = "validation"
TRAIN = "train"
SPLITS = (VALIDATION, TRAIN)
#: Below this many images nothing is held out (a run needs its few images to train on).
MIN_IMAGES_TO_HOLD_OUT = 5

__all__ = [
    "SPLIT_FILE", "DEFAULT_FRACTION", "VALIDATION", "TRAIN", "SplitError", "SplitSettings",
    "load_settings", "rank", "held_out_target", "assign_batch", "fill_manifest_splits",
    "folder_splits",
]


class SplitError(ValueError):
    """``split.json`` is malformed; the message names the file and field."""


@dataclass(frozen=True)
class SplitSettings:
    """The data set's salt and held-out fraction (``split.json``)."""

    salt: str
    fraction: float


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise SplitError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("salt"), str) or not raw["salt"]:
        raise SplitError(f"{path}: expected an object with a 'salt' string")
    fraction = raw.get("fraction", DEFAULT_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise SplitError(f"{path}: fraction must be a number in [0, 1), got {fraction!r}")
    assigned = raw.get("assigned", {})
    if not isinstance(assigned, dict) or any(v not in SPLITS for v in assigned.values()):
        raise SplitError(f"{path}: assigned must map image paths to 'validation' or 'train'")
    return raw


#: The salt of a data set that has no ``split.json`` and is not given one (training reads a data
#: set, it never writes into it): fixed, so every run on such a folder holds out the same images.
UNRECORDED_SALT = "animelora-unrecorded"


def load_settings(root: Path | str, fraction: float | None = None, *, create: bool = True) -> SplitSettings:
    """The data set's split settings; created once (random salt) when missing and ``create``,
    else (missing, not created) the fixed :data:`UNRECORDED_SALT`.

    ``fraction`` only matters when the file is created: an existing data set keeps its own.
    Two processes creating it at once agree (exclusive create; the later one reads the file).
    """
    path = Path(root) / SPLIT_FILE
    raw = _read(path)
    if raw is None:
        # a data set that already has versions or a manifest was trained on (in memory) with
        # the fixed salt: recording keeps it, so the recorded sides are the ones runs used
        existing = DatasetPaths(root).has_history()
        data = {"salt": UNRECORDED_SALT if existing else secrets.token_hex(16),
                "fraction": DEFAULT_FRACTION if fraction is None else float(fraction)}
        if not create:
            return SplitSettings(UNRECORDED_SALT, data["fraction"])
        try:
            atomic_write_json(path, data, indent=1, prefix=".split.", suffix=".json.tmp", exclusive=True)
        except FileExistsError:
            pass
        raw = _read(path) or data
    return SplitSettings(raw["salt"], float(raw.get("fraction", DEFAULT_FRACTION)))


def rank(salt: str, key: str) -> str:
    """The image's place in the held-out order (lowest first): ``sha256(salt:key)``."""
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def held_out_target(n: int, fraction: float) -> int:
    """How many of ``n`` images the data set holds out: ``round(n * fraction)``, at least one
    from 5 images on, never all of them."""
    if n < MIN_IMAGES_TO_HOLD_OUT or fraction <= 0:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def assign_batch(assigned: Mapping[str, str], new_keys: Iterable[str], settings: SplitSettings) -> dict[str, str]:
    """Sides for the keys in ``new_keys`` not yet in ``assigned`` (the old ones never change).

    The batch tops the held-out count of the whole up to :func:`held_out_target`, taking the
    new keys of lowest :func:`rank`; the rest train.
    """
    new = sorted({k for k in new_keys if k not in assigned}, key=lambda k: rank(settings.salt, k))
    if not new:
        return {}
    have = sum(1 for v in assigned.values() if v == VALIDATION)
    want = held_out_target(len(assigned) + len(new), settings.fraction)
    k = max(0, min(len(new), want - have))
    if len(assigned) - have + len(new) - k == 0 and k > 0:
        k -= 1  # keep one image to train on
    return {key: (VALIDATION if i < k else TRAIN) for i, key in enumerate(new)}


# --------------------------------------------------------------------------------------------
# data sets with a manifest: the ``split`` column, keyed by row id


def _version_order(value: Any) -> tuple[int, str]:
    text = str(value or "")
    digits = text[1:] if text.startswith("v") else ""
    return (int(digits) if digits.isdigit() else -1, text)


def fill_manifest_splits(rows: Sequence[dict[str, Any]], settings: SplitSettings) -> int:
    """Set ``split`` on every kept row that has none, in place; returns how many were set.

    Rows are assigned in batches of one ``version_added`` each, oldest first, so the answer
    does not depend on when it is computed (a run reading an old manifest in memory and a
    refresh recording it later agree).
    """
    assigned = {r["id"]: r["split"] for r in rows if r.get("status") == "kept" and r.get("split") in SPLITS}
    todo = [r for r in rows if r.get("status") == "kept" and r.get("split") not in SPLITS]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in todo:
        groups.setdefault(row.get("version_added"), []).append(row)
    for version in sorted(groups, key=_version_order):
        batch = groups[version]
        sides = assign_batch(assigned, [r["id"] for r in batch], settings)
        for row in batch:
            row["split"] = sides.get(row["id"], assigned.get(row["id"], TRAIN))
        assigned.update(sides)
    return len(todo)


# --------------------------------------------------------------------------------------------
# folders without a manifest: assignments by image path in split.json


def folder_splits(root: Path | str, names: Sequence[str], fraction: float | None = None, *,
                  record: bool = True) -> dict[str, str]:
    """``{name: side}`` for a folder without a manifest; with ``record`` (the data-set writers:
    a new version, an import) new names are recorded in ``split.json``.

    The names not yet recorded form one batch. Without ``record`` (training, which never writes
    into a data set) or when the folder cannot be written, the sides are computed in memory.
    """
    root = Path(root)
    path = root / SPLIT_FILE
    writable = record
    if record:
        try:
            settings = load_settings(root, fraction)
        except OSError as exc:
            log.warning("cannot create %s (%s): the held-out split is not recorded", path, exc)
            writable = False
    if not writable:
        settings = load_settings(root, fraction, create=False)
    raw = _read(path) or {"salt": settings.salt, "fraction": settings.fraction}
    assigned: dict[str, str] = dict(raw.get("assigned", {}))
    sides = assign_batch(assigned, names, settings)
    if sides and writable:
        assigned.update(sides)
        try:
            atomic_write_json(path, {**raw, "assigned": dict(sorted(assigned.items()))}, indent=1,
                              prefix=".split.", suffix=".json.tmp")
        except OSError as exc:
            log.warning("cannot record the held-out split in %s (%s)", path, exc)
    else:
        assigned.update(sides)
    return {name: assigned[name] for name in names}
