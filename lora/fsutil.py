"""Crash-safe file primitives shared by every area: atomic writes, folder swaps, file hashes.

Why: the data set, the trainer, the results tools and the test helpers all promise that a
reader (or a crash) never sees half a file or half a folder. Each used to carry its own copy
of "write a temporary name in the same folder, fsync, ``os.replace``"; this module is the
one tested copy. Rules it keeps:

- The temporary file lives in the destination folder (``os.replace`` is only atomic within
  one file system) under a hidden name (``.<name>.<random><suffix>`` unless a caller needs
  another prefix), and is removed on *any* failure, including KeyboardInterrupt.
- Data is fsynced before the rename, so after a power loss the new name never points at
  an empty file. Callers that never fsynced (reports, plots, caches) may opt out.
- A folder is replaced by a fully built sibling; the old one is removed only after the new
  one is in place, and is put back when the swap itself fails.
- What is created follows the umask, as ``open()`` and ``mkdir`` do (0644 files and 0755
  folders under the usual umask 022), never the private 0600/0700 of ``tempfile.mkstemp`` /
  ``mkdtemp``: data sets, LoRA files and samples are read by other programs, often under
  another user (an A1111/ComfyUI container, a Prefect worker).

No Prefect, no third-party imports: this is imported by the lowest layers.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_digest",
    "fsync_path",
    "make_temp_dir",
    "swap_dir",
]

_CHUNK = 1 << 20


def _create_temp(folder: Path, prefix: str, suffix: str, mode: int) -> Path:
    """A new, empty file with a unique name in ``folder`` (``O_EXCL``, so never someone else's).

    ``mode`` goes through the umask like ``open()`` (0o666 gives what ``open()`` gives).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no unused temporary name {prefix}*{suffix} in {folder}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _publish_new(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s content the name ``path``, failing with FileExistsError if it exists.

    ``os.link`` refuses to replace an existing file, so two writers cannot both create it.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: the caller must hold a lock
        if path.exists():
            raise FileExistsError(str(path)) from None
        os.replace(tmp, path)


def atomic_write(
    path: Path | str,
    write: Callable[[Path], None],
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
    fsync: bool = True,
    exclusive: bool = False,
    mode: int = 0o666,
) -> Path:
    """Create or replace ``path`` with whatever ``write(tmp)`` puts into a temporary file.

    ``write`` receives the path of an existing, empty temporary file in ``path``'s folder
    (created as ``<prefix><random><suffix>``, prefix default ``.<name>.``) and may open,
    truncate or overwrite it by name (e.g. ``pq.write_table``). A writer that replaces the file
    by a rename of its own (safetensors' ``save_file``) leaves that file's permissions, 0600 for
    safetensors: serialise to bytes (``safetensors.torch.save``) and use :func:`atomic_write_bytes`.
    Then the file is fsynced (``fsync=True``) and renamed over ``path``. If anything fails,
    ``path`` keeps its old content and the temporary file is removed; the error propagates.

    ``exclusive=True`` creates ``path`` only if it does not exist yet (FileExistsError
    otherwise), atomically even between processes. ``mode`` is the new file's permission
    before the umask: 0o666 (default) is what ``open()`` gives; pass 0o600 for a file only
    its owner may read. The parent folder is created if needed. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, f".{path.name}." if prefix is None else prefix, suffix, mode)
    try:
        write(tmp)
        if fsync:
            _fsync_file(tmp)
        if exclusive:
            _publish_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        # Gone after os.replace; still there after a failure or a hard link.
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(
    path: Path | str,
    data: bytes,
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
    fsync: bool = True,
    exclusive: bool = False,
    mode: int = 0o666,
) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), prefix=prefix, suffix=suffix,
                        fsync=fsync, exclusive=exclusive, mode=mode)


def atomic_write_text(
    path: Path | str,
    text: str,
    *,
    encoding: str = "utf-8",
    prefix: str | None = None,
    suffix: str = ".tmp",
    fsync: bool = True,
    exclusive: bool = False,
    mode: int = 0o666,
) -> Path:
    """Write ``text`` (encoded, newlines untouched) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding), prefix=prefix, suffix=suffix,
                              fsync=fsync, exclusive=exclusive, mode=mode)


def atomic_write_json(
    path: Path | str,
    obj: Any,
    *,
    indent: int | None = 1,
    prefix: str | None = None,
    suffix: str = ".tmp",
    fsync: bool = True,
    exclusive: bool = False,
    mode: int = 0o666,
) -> Path:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=indent)`` plus a final newline) atomically.

    The serialisation happens before the temporary file exists, so an object that is not
    JSON-serialisable raises TypeError and leaves nothing behind.
    """
    text = json.dumps(obj, indent=indent) + "\n"
    return atomic_write_text(path, text, prefix=prefix, suffix=suffix, fsync=fsync,
                             exclusive=exclusive, mode=mode)


def make_temp_dir(parent: Path | str, prefix: str) -> Path:
    """A new, empty folder ``<prefix><random>`` in ``parent`` (created if needed), never an existing one.

    Like ``tempfile.mkdtemp`` but with ``mkdir``'s permissions (0o777 minus the umask), since
    the folder is usually renamed into place as an output (samples, a staged upload).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no unused temporary folder name {prefix}* in {parent}")


def swap_dir(tmp_dir: Path | str, target_dir: Path | str, *, old: Path | str | None = None) -> None:
    """Put the fully built folder ``tmp_dir`` in place of ``target_dir`` (which may not exist).

    Why: a folder cannot be replaced in one rename, so the current folder is first renamed
    aside (to ``old``, default ``.<target name>.old-<pid>`` next to it), then ``tmp_dir`` is
    renamed to ``target_dir``, and only then is the old folder removed. If that second rename
    fails, the old folder is renamed back, so ``target_dir`` is never lost. ``tmp_dir`` must
    be on the same file system (build it as a hidden sibling). A stale ``old`` left by a
    crashed earlier swap is removed first.
    """
    tmp_dir, target = Path(tmp_dir), Path(target_dir)
    aside: Path | None = None
    if target.exists():
        aside = Path(old) if old is not None else target.with_name(f".{target.name}.old-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
    try:
        os.replace(tmp_dir, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def fsync_path(path: Path | str) -> None:
    """Best-effort fsync of a file or folder by name (a folder's fsync makes renames in it durable).

    Errors are ignored: some file systems cannot fsync a folder, and a missing path has
    nothing to flush.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: Path | str, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes (``algo`` as ``hashlib.new`` names it), read in 1 MiB blocks
    so large images and weights never sit whole in memory."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def human_size(num_bytes: int) -> str:
    """``num_bytes`` in binary units (B, KiB, MiB, GiB), one decimal above bytes: one format
    for the CLI's upload plan and the Prefect UI's artifact tables."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
