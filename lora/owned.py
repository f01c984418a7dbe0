"""The write policy: what animelora may write, replace or delete, and how it proves a file is its own.

Why one module: every output path that was added by hand (``publish`` rebuilding ``hub/``,
``analyze --plot``, ``sample --out``, the run's ``report/``) once had its own idea of what it
may clobber, and each new path brought the same defect back: a hand-edited card deleted, a log
overwritten by a plot. Here is the single rule, and commands call it instead of ``rmtree`` or a
bare ``write_text``:

- A folder the project rebuilds (``hub/``, ``report/``, a samples folder...) carries a ledger,
  ``.animelora.json``, listing every file the project wrote there with its SHA-256. Such a folder
  is replaced only when everything in it is in the ledger and unchanged since: a file the user
  added, edited or linked there stops the command with one line that names it, and nothing is
  changed. A folder written before ledgers existed is accepted only when every name in it is one
  the project itself generates (``legacy`` of its :class:`FolderKind`).
- A single file the user names (``analyze --plot OUT.png``) is written only where nothing is,
  or over a file the project wrote before (proved by a signature inside the file, such as a PNG
  text chunk), never over anything else.
- Uploads and exports read the ledger, never a glob: a file that someone else put beside the
  project's files is never sent anywhere.

All writes go through :mod:`lora.fsutil` (temporary name, then rename), so a crash or a refusal
never leaves half a folder. No Prefect, no third-party imports.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator

from lora.fsutil import atomic_write_json, file_digest, make_temp_dir, swap_dir

__all__ = [
    "LEDGER", "FolderKind", "NotOursError", "build_folder", "check_replaceable", "foreign_entries",
    "ledger_files", "record_files", "check_output_file", "describe_entries",
]

#: The ledger file in every folder the project rebuilds (hidden, never uploaded).
LEDGER = ".animelora.json"
_LEDGER_FORMAT = 1


class NotOursError(ValueError):
    """Writing there would replace or delete something animelora cannot prove it wrote.

    A ValueError: it is the user's path that is wrong (exit 2), and nothing was changed.
    """


@dataclass(frozen=True)
class FolderKind:
    """One kind of folder the project rebuilds whole.

    ``what`` names it in messages ("the Hub staging folder"); ``legacy`` are glob patterns
    (relative, forward slashes) of the files an older animelora wrote there before the ledger
    existed, so such a folder is still recognised as the project's own.
    """

    what: str
    legacy: tuple[str, ...] = field(default=())


def _relative_files(folder: Path) -> list[str]:
    """Every entry under ``folder`` that is not a plain folder, as relative POSIX paths."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        out.append(p.relative_to(folder).as_posix())
    return out


def ledger_files(folder: Path | str) -> dict[str, str] | None:
    """The ledger of ``folder``: relative path -> SHA-256 of each file the project wrote.

    None when the folder has no readable ledger (not ours, or written before ledgers).
    """
    try:
        data = json.loads((Path(folder) / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in files.items()):
        return None
    return dict(files)


def record_files(folder: Path | str, names: list[str] | None = None, *, merge: bool = False) -> dict[str, str]:
    """Write ``folder``'s ledger: the SHA-256 of ``names`` (default: every file in it).

    ``merge=True`` keeps the entries of an existing ledger (files written by an earlier
    command into the same folder) and adds or updates ``names``.
    """
    folder = Path(folder)
    names = [n for n in (names if names is not None else _relative_files(folder)) if n != LEDGER]
    files = dict(ledger_files(folder) or {}) if merge else {}
    for name in names:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            files[name] = file_digest(path)
    atomic_write_json(folder / LEDGER, {"format": _LEDGER_FORMAT, "written_by": "animelora",
                                        "files": dict(sorted(files.items()))}, fsync=False)
    return files


def foreign_entries(folder: Path | str, kind: FolderKind) -> list[str]:
    """What in ``folder`` the project cannot prove it wrote: added, edited or linked entries.

    A missing folder has none. An edited file is shown as ``NAME (edited)``.
    """
    folder = Path(folder)
    if not folder.exists():
        return []
    ledger = ledger_files(folder)
    foreign: list[str] = []
    for name in _relative_files(folder):
        if name == LEDGER:
            continue
        path = folder / name
        if path.is_symlink() or not path.is_file():
            foreign.append(name)
        elif ledger is None:
            if not any(fnmatch(name, pattern) for pattern in kind.legacy):
                foreign.append(name)
        elif name not in ledger:
            foreign.append(name)
        elif file_digest(path) != ledger[name]:
            foreign.append(f"{name} (edited)")
    return foreign


def describe_entries(entries: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a list of paths short enough for one line."""
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_replaceable(folder: Path | str, kind: FolderKind, *, hint: str = "") -> Path:
    """Refuse (:class:`NotOursError`) unless ``folder`` may be rebuilt without losing anything.

    Accepted: no such path, an empty folder, or a folder whose every file the project wrote and
    nobody changed since. ``hint`` ends the message with what the user can do instead.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise NotOursError(f"{folder} is not a folder animelora made ({kind.what}); move it away "
                           f"(nothing was changed){'; ' + hint if hint else ''}")
    foreign = foreign_entries(folder, kind)
    if foreign:
        raise NotOursError(
            f"{folder} ({kind.what}) holds files animelora did not write or that were changed since: "
            f"{describe_entries(foreign)}; move them elsewhere, animelora rebuilds this folder whole "
            f"(nothing was changed){'; ' + hint if hint else ''}")
    return folder


@contextmanager
def build_folder(target: Path | str, kind: FolderKind, *, hint: str = "") -> Iterator[Path]:
    """Build a new ``target`` in a hidden sibling folder, then swap it in with a ledger.

    Usage: ``with build_folder(paths.hub, HUB) as tmp: write files into tmp``. The check runs
    before the body (a refusal costs nothing) and again just before the swap (nothing of anyone
    else's arrived meanwhile). On any failure the temporary folder is removed and ``target``
    is untouched.
    """
    target = Path(target)
    check_replaceable(target, kind, hint=hint)
    tmp = make_temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        record_files(tmp)
        check_replaceable(target, kind, hint=hint)
        swap_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: A file the user names for output: a check that it was written by the project, by suffix.
SignatureCheck = Callable[[Path], bool]


def check_output_file(path: Path | str, *, suffixes: tuple[str, ...], ours: SignatureCheck,
                      what: str) -> Path:
    """Refuse (:class:`NotOursError`) to write ``what`` to ``path`` unless it is free or ours.

    The suffix must be one of ``suffixes`` (a plot named ``training_log.json`` is a mistake);
    an existing file is replaced only when ``ours(path)`` proves the project wrote it; a folder,
    a link or anything else is never replaced. The parent folder must exist.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise NotOursError(f"{path}: {what} must end in {' or '.join(suffixes)}")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise NotOursError(f"{path} exists and is not a plain file; name a new file (nothing was changed)")
    if path.exists() and not ours(path):
        raise NotOursError(f"{path} exists and was not written by animelora; name a new file or move "
                           "it away (nothing was changed)")
    if not path.parent.is_dir():
        raise NotOursError(f"{path}: folder {path.parent} does not exist")
    return path
