"""The data-set folder's layout (``<workspace>/datasets/<name>/``): every name in it.

Why one owner: fetch, import, the refresh steps, training, the input checks, the Hub card and
the flows all find files in a data set. When each of them spelled ``ws / "datasets" / name`` or
``root / "versions"`` itself, a layout change touched a dozen files in four layers. Here is the
only place that knows the names (docs/architecture.md, "Dataset folder"), as
:class:`lora.runpaths.RunPaths` is for run folders; ``tests/runfolder/test_datapaths_literals.py``
keeps the literals from coming back elsewhere. It only names paths (standard library only), so
the input checks, the flows and the command line can ask it without importing pyarrow or torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DATASETS_DIR", "DatasetPaths", "valid_dataset_name"]

#: ``<workspace>/datasets/``: where data sets live in a workspace.
DATASETS_DIR = "datasets"
IMAGES_DIR = "images"
VERSIONS_DIR = "versions"
MANIFEST_FILE = "manifest.parquet"
#: Per-query fetch cursors (lora/data/state.py).
STATE_FILE = "state.json"
#: The held-out split's salt and recorded sides (lora/data/split.py).
SPLIT_FILE = "split.json"
#: Downloads and prepared-but-uncommitted images (lora/data/staging.py); never in a version.
STAGING_DIR = ".staging"
STAGING_DOWNLOADS = "download"
STAGING_PREPARED = "prepared"
STAGING_ROWS = "rows"
#: The OS lock of the one process writing the data set (lora/data/manifest.py).
LOCK_FILE = ".lock"
VERSION_SUFFIX = ".json"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def valid_dataset_name(name: object) -> bool:
    """Whether ``name`` is a plain folder name a data set may have (no slashes, at most 100)."""
    return isinstance(name, str) and bool(_NAME_RE.match(name))


@dataclass(frozen=True)
class DatasetPaths:
    """Where everything of one data set lives (see docs/architecture.md).

    ``root`` is taken as given (not resolved), so paths shown to the user keep their form.
    """

    root: Path

    def __init__(self, root: Path | str) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, workspace: str | Path, name: str) -> "DatasetPaths":
        """``<workspace>/datasets/<name>``; ``name`` must be a plain folder name."""
        if not valid_dataset_name(name):
            raise ValueError(
                f"dataset name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                "(no slashes, at most 100 characters)"
            )
        return cls(cls.datasets_root(workspace) / name)

    @staticmethod
    def datasets_root(workspace: Path | str) -> Path:
        """``<workspace>/datasets`` (the workspace resolved)."""
        return Path(workspace).expanduser().resolve() / DATASETS_DIR

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def workspace(self) -> Path | None:
        """The workspace this data set lives in (``<ws>/datasets/<name>``), or None elsewhere."""
        return self.root.parent.parent if self.root.parent.name == DATASETS_DIR else None

    # -- the files and folders ----------------------------------------------------------------

    @property
    def images(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def versions(self) -> Path:
        return self.root / VERSIONS_DIR

    def version_file(self, version: str) -> Path:
        """``versions/<version>.json``."""
        return self.versions / f"{version}{VERSION_SUFFIX}"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def split_file(self) -> Path:
        return self.root / SPLIT_FILE

    @property
    def staging(self) -> Path:
        """Downloads and prepared-but-uncommitted images; never part of a version."""
        return self.root / STAGING_DIR

    @property
    def downloads(self) -> Path:
        """Half-finished and finished downloads waiting to be prepared."""
        return self.staging / STAGING_DOWNLOADS

    @property
    def prepared(self) -> Path:
        """Prepared images (and captions) waiting for their commit into ``images/``."""
        return self.staging / STAGING_PREPARED

    @property
    def pending_rows(self) -> Path:
        """One JSON row per prepared candidate, so an interrupted refresh re-uses its work."""
        return self.staging / STAGING_ROWS

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @staticmethod
    def image_entry(file_name: str) -> str:
        """How a manifest row and a version name an image: ``images/<file>``, relative, POSIX."""
        return f"{IMAGES_DIR}/{file_name}"

    # -- what the folder is --------------------------------------------------------------------

    def looks_like_dataset(self) -> bool:
        """Whether the folder holds a data set's files (a manifest, or ``images/`` + ``versions/``)."""
        return self.manifest.is_file() or (self.images.is_dir() and self.versions.is_dir())

    def has_history(self) -> bool:
        """Whether a manifest or a version was ever written here (older data sets' split rule)."""
        return self.manifest.exists() or any(self.versions.glob(f"*{VERSION_SUFFIX}"))

    def ensure(self) -> "DatasetPaths":
        for folder in (self.images, self.versions, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        return self
