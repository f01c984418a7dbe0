"""Where input is checked: every name and path from a user or a file, before any work starts.

Why one module: an hour of training must never end in a name that cannot be written (a run
name with a slash breaks the kohya export), and a run folder must never land inside a data set
or be the workspace itself. When each command checked its own arguments, the next command
forgot. Every check here raises :class:`InputError` (a ValueError) with one line that names
the argument; the command line turns it into exit 2 before anything is loaded, and the Prefect
flows call the same functions on their parameters.

Data sets are recognised by their own files (``manifest.parquet``, or ``images/`` beside
``versions/``), workspaces by ``datasets/`` or ``runs/`` in them: no registry is needed and a
folder moved by hand is still recognised. No Prefect, no third-party imports at module level.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable

from lora.datapaths import DATASETS_DIR, DatasetPaths
from lora.runpaths import RUNS_DIR

__all__ = [
    "InputError", "MAX_NAME_LENGTH", "check_cache_env", "check_dataset_dir", "check_finite",
    "check_pipeline_inputs", "check_repo_id", "check_run_dir", "check_run_name", "check_workspace", "dataset_root_of",
    "is_workspace_root",
]

#: Longest run or data-set name: with ``.safetensors`` and a folder it stays far below the
#: 255-byte file-name limit of every file system and the Hub's 96-character repo names.
MAX_NAME_LENGTH = 100
#: Characters that some file system (Windows, FAT/exFAT on a USB disk or Drive) refuses in a
#: file name, plus the path separators.
_BAD_NAME_CHARS = set('<>:"/\\|?*')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
#: The Hub's repo-name rule (huggingface_hub.utils.validate_repo_id): letters, digits, ``-``,
#: ``_``, ``.``; no ``--`` or ``..``; not starting or ending with ``-`` or ``.``; at most 96.
_HUB_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_WORKSPACE_MARKERS = (DATASETS_DIR, RUNS_DIR)


class InputError(ValueError):
    """A name, path or number from the user or a file that cannot work (one line, exit 2)."""


def check_run_name(name: str, *, what: str = "run name") -> str:
    """``name`` if it is usable as a file name on every system the LoRA files travel to.

    The run name becomes ``lora/<run name>.safetensors`` and the Hub staging: checked here so
    the export at the end of a long run cannot fail on it.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{what} is empty")
    if name != name.strip() or name.endswith("."):
        raise InputError(f"{what} {name!r} starts or ends with a space or ends with a dot "
                         "(Windows and the Hub cannot store it)")
    bad = sorted({c for c in name if c in _BAD_NAME_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise InputError(f"{what} {name!r} holds characters a file name cannot have ({shown}); "
                         "use letters, digits, '-', '_' or '.'")
    if name in (".", "..") or name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise InputError(f"{what} {name!r} is reserved as a file name; pick another")
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"{what} is {len(name)} characters long; at most {MAX_NAME_LENGTH}")
    return name


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub would accept it as ``USER/NAME`` (checked before anything is staged)."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InputError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    for part in repo_id.split("/"):
        if not _HUB_NAME.match(part) or "--" in part or ".." in part or part.endswith(".git"):
            raise InputError(
                f"--repo-id {repo_id!r}: {part!r} is not a valid Hub name (letters, digits, '-', '_', "
                "'.'; at most 96 characters; no '--' or '..'; not starting or ending with '-' or '.')")
    return repo_id


def check_finite(name: str, value: float, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` if it is a finite number within [low, high]; the message names the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"between {low} and {high}" if low is not None and high is not None else \
            f"at least {low}" if low is not None else f"at most {high}"
        raise InputError(f"{name} must be {bounds}, got {value!r}")
    return value


def _existing_self_and_parents(path: Path) -> Iterable[Path]:
    for candidate in (path, *path.parents):
        if candidate.exists():
            yield candidate


def dataset_root_of(path: Path | str) -> Path | None:
    """The data set ``path`` is in (or is), recognised by its files; None outside any data set."""
    resolved = Path(path).expanduser().resolve()
    for candidate in _existing_self_and_parents(resolved):
        if not candidate.is_dir():
            continue
        if DatasetPaths(candidate).looks_like_dataset():
            return candidate
    return None


def is_workspace_root(path: Path | str) -> bool:
    """Whether ``path`` is a workspace folder (it holds ``datasets/`` or ``runs/``)."""
    path = Path(path).expanduser()
    return path.is_dir() and any((path / m).is_dir() for m in _WORKSPACE_MARKERS)


def check_run_dir(run_dir: Path | str, *, dataset: Path | str | None = None,
                  flag: str = "--run-dir") -> Path:
    """The resolved run folder, if training may write there.

    Refused: a file; the root of the file system or the home folder; a workspace root or its
    ``runs/``/``datasets/`` folders; the data set itself, anything inside a data set (its
    ``images/`` above all) or a folder that holds the data set. The folder's name must be a
    usable run name (it names the LoRA file unless ``--run-name`` is given).
    """
    raw = Path(run_dir).expanduser()
    path = raw.resolve()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {raw} is a file, not a folder")
    if path == Path(path.anchor) or path == Path.home().resolve():
        raise InputError(f"{flag} {raw} is the file-system root or your home folder; name a run "
                         "folder such as workspace/runs/<name>")
    if is_workspace_root(path):
        raise InputError(f"{flag} {raw} is a workspace folder; name a run folder inside it, such as "
                         f"{raw / RUNS_DIR / 'my-run'}")
    if path.name in _WORKSPACE_MARKERS and is_workspace_root(path.parent):
        raise InputError(f"{flag} {raw} is the workspace's {path.name}/ folder; name a run folder "
                         f"inside {RUNS_DIR}/, such as {path.parent / RUNS_DIR / 'my-run'}")
    inside = dataset_root_of(path)
    if inside is not None:
        raise InputError(f"{flag} {raw} is inside the data set {inside}; run files never go into a "
                         "data set: name a folder under <workspace>/runs/")
    if dataset is not None:
        ds = Path(dataset).expanduser().resolve()
        if path == ds or ds in path.parents or path in ds.parents:
            raise InputError(f"{flag} {raw} is, holds or is inside the data set {ds}; name a folder "
                             "under <workspace>/runs/")
    check_run_name(path.name, what=f"{flag} folder name")
    return path


def check_dataset_dir(dataset: Path | str, *, flag: str = "--dataset") -> Path:
    """The resolved data-set folder, if it exists and is not a file or a workspace."""
    raw = Path(dataset).expanduser()
    path = raw.resolve()
    if not path.exists():
        raise InputError(f"{flag} {raw}: no such data-set folder")
    if not path.is_dir():
        raise InputError(f"{flag} {raw} is a file, not a data-set folder")
    if is_workspace_root(path) and dataset_root_of(path) is None:
        raise InputError(f"{flag} {raw} is a workspace; name one of its data sets, such as "
                         f"{raw / DATASETS_DIR / 'anime'}")
    return path


def check_workspace(workspace: Path | str, *, flag: str = "--workspace") -> Path:
    """The resolved workspace, if it is a folder (or can be created) and not inside a data set."""
    raw = Path(workspace).expanduser()
    path = raw.resolve()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {raw} is a file, not a folder")
    inside = dataset_root_of(path)
    if inside is not None:
        raise InputError(f"{flag} {raw} is inside the data set {inside}; a workspace holds data sets")
    return path


def check_cache_env(env: dict[str, str] | None = None) -> Path | None:
    """``$ANIMELORA_CACHE`` as a folder path when set; a file or an empty value is refused."""
    value = (os.environ if env is None else env).get("ANIMELORA_CACHE")
    if value is None:
        return None
    if not value.strip():
        raise InputError("ANIMELORA_CACHE is set but empty; unset it or name a folder")
    path = Path(value).expanduser()
    for candidate in _existing_self_and_parents(path.resolve()):
        if not candidate.is_dir():
            raise InputError(f"ANIMELORA_CACHE={value} names a file ({candidate}); it must name a folder")
        break
    if dataset_root_of(path) is not None:
        raise InputError(f"ANIMELORA_CACHE={value} is inside a data set; caches never go there")
    return path


def check_pipeline_inputs(*, workspace: Path | str, dataset: str, run_name: str | None = None,
                          repo_id: str | None = None) -> None:
    """The Prefect flows' names and paths, checked before the first task (the same rules as the CLI).

    A flow run started from the UI has no argparse in front of it: this is its preflight.
    """
    check_workspace(workspace, flag="workspace")
    check_run_name(dataset, what="dataset")
    if run_name is not None:
        check_run_name(run_name, what="run_name")
    if repo_id:
        check_repo_id(repo_id)
    check_cache_env()
