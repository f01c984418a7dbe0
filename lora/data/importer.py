"""`animelora import`: bring a local folder into a data set through the same steps as a fetch.

Why: users arrive with images already on disk, either a plain folder (optionally with kohya
``.txt`` captions) or the layout of the old downloader script::

    <style>/<file>.png
    metadata.json   {"training_data": [{"file", "style", "tags", "width", "height", "danbooru_id"}]}

Both go through exact (md5) and perceptual (phash) dedup against the whole data set, image
preparation and captioning, and a new version is written, exactly as for a Danbooru refresh.
Imported files get a stable id (the Danbooru id when known, else ``local-<md5 prefix>``), so
importing the same folder twice adds nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from lora.data.captions import (
    CaptionFileError,
    CaptionOptions,
    TagSet,
    build_caption,
    caption_from_text,
    load_caption,
    split_caption,
)
from lora.data.duplicates import has_caption
from lora.data.images import DEFAULT_MAX_PIXELS
from lora.data.manifest import DatasetPaths, dataset_lock, leaves_folder, load_rows
from lora.data.candidates import Candidate, KnownRows, make_row
from lora.data.commit import FILE_MISSING, commit, recover
from lora.data.prepare import PrepareOptions, ProgressCallback, prepare_local
from lora.data.summary import RefreshSummary
from lora.data.versions import latest_version
from lora.fsutil import file_digest

__all__ = ["FolderImportError", "FolderScan", "import_folder", "scan_folder", "IMPORT_EXTS"]

log = logging.getLogger(__name__)

IMPORT_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif", ".tif", ".tiff"})


class FolderImportError(ValueError):
    """The source folder cannot be imported (missing, or a malformed metadata.json)."""


def _danbooru_tags(tags: TagSet) -> dict[str, str]:
    """Tag fields for the manifest in Danbooru spelling (spaces inside a tag become ``_``)."""
    def join(items: Iterable[str]) -> str:
        return " ".join(t.strip().replace(" ", "_") for t in items if t.strip())

    return {
        "tags_general": join(tags.general),
        "tags_character": join(tags.character),
        "tags_copyright": join(tags.copyright),
        "tags_artist": join(tags.artist),
        "tags_meta": join(tags.meta),
    }


#: Largest id a manifest can hold (its ``post_id`` column is a signed 64-bit integer).
MAX_POST_ID = 2**63 - 1


@dataclass
class FolderScan:
    """What :func:`scan_folder` found, and what it passed over (for the summary).

    ``skipped``: files and metadata entries not imported, ``{"path", "reason"}`` with the path
    as the user knows it (under the folder given to ``--from``). They are not manifest rows:
    once the user fixes them, the next import brings them in. ``lenient``: ``(path, note)`` for
    captions read leniently (several lines joined, Latin-1).
    """

    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    lenient: list[tuple[str, str]] = field(default_factory=list)
    hidden_skipped: int = 0
    symlinks_refused: list[str] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        self.skipped.append({"path": path, "reason": reason})

    def notes(self) -> list[str]:
        """One line per thing passed over, for the summary the user reads."""
        notes = []
        if self.hidden_skipped:
            notes.append(f"skipped {self.hidden_skipped} hidden file(s) or folder(s) (names starting with '.')")
        if self.symlinks_refused:
            notes.append(f"refused {len(self.symlinks_refused)} symlink(s) leading out of the source folder "
                         f"({_shown(self.symlinks_refused)}); pass --follow-symlinks to import them")
        if self.empty_folders:
            notes.append(f"{len(self.empty_folders)} empty folder(s): {_shown(self.empty_folders)}")
        by_note: dict[str, list[str]] = {}
        for path, note in self.lenient:
            by_note.setdefault(note, []).append(path)
        notes += [f"caption {note}: {_shown(paths, 5)}" for note, paths in by_note.items()]
        return notes


def _shown(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _image_files(root: Path, scan: FolderScan, follow_symlinks: bool) -> list[Path]:
    """Image files under ``root`` (sorted), counting what is passed over into ``scan``.

    Hidden names are skipped. A symlink (file or folder) whose target lies outside ``root`` is
    refused unless ``follow_symlinks``; followed folders are walked once (no loops)."""
    files: list[Path] = []
    visited: set[Path] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here = Path(folder)
        real = here.resolve()
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        kept_dirs = []
        for name in sorted(dirnames):
            if name.startswith("."):
                scan.hidden_skipped += 1
                continue
            path = here / name
            if path.is_symlink() and not _inside(path.resolve(), root):
                if not follow_symlinks:
                    scan.symlinks_refused.append(path.relative_to(root).as_posix() + "/")
                    continue
            kept_dirs.append(name)
        dirnames[:] = kept_dirs
        if not dirnames and not filenames and here != root:
            scan.empty_folders.append(here.relative_to(root).as_posix() + "/")
        for name in sorted(filenames):
            path = here / name
            if name.startswith("."):
                scan.hidden_skipped += 1
                continue
            if path.is_symlink() and not _inside(path.resolve(), root) and not follow_symlinks:
                scan.symlinks_refused.append(path.relative_to(root).as_posix())
                continue
            if path.suffix.lower() in IMPORT_EXTS and path.is_file():
                files.append(path)
    return sorted(files)


def _load_metadata(root: Path, shown: Path) -> list[tuple[int, Any]] | None:
    """``(index, entry)`` of ``metadata.json``'s ``training_data`` (None: no such file, or one of
    another tool). Refused with one line (FolderImportError), before any work: a file that is
    not JSON, and any entry whose ``file`` or ``style`` is absolute or climbs out with ``..``
    (what else would such an entry be for). Entries that are wrong in another way are returned
    and skipped one by one (:func:`_entry_problem`)."""
    meta = root / "metadata.json"
    if not meta.exists():
        return None
    where = shown / "metadata.json"
    try:
        data = json.loads(meta.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FolderImportError(f"{where} is not valid JSON: {exc}") from exc
    entries = data.get("training_data") if isinstance(data, dict) else None
    if entries is None:
        return None  # some other metadata.json: treat the folder as plain images
    if not isinstance(entries, list):
        raise FolderImportError(f"{where}: 'training_data' must be a list")
    for i, entry in enumerate(entries):
        for key in ("file", "style"):
            value = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(value, str) and leaves_folder(value):
                raise FolderImportError(
                    f"{where}: training_data[{i}] {key} {value!r} leads out of the source folder; "
                    "nothing was imported")
    return list(enumerate(entries))


def _post_id(raw: Any) -> int | None:
    """``danbooru_id`` as a manifest post id (None: absent); ValueError names what is wrong."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"bad-danbooru-id: {raw!r} is not a number")
    if not 1 <= raw <= MAX_POST_ID:
        raise ValueError(f"bad-danbooru-id: {raw} is not between 1 and {MAX_POST_ID}")
    return raw


def _entry_problem(entry: Any) -> str | None:
    """Why a ``metadata.json`` entry cannot be imported (its type), or None."""
    if not isinstance(entry, dict):
        return "bad-entry: not an object"
    if not isinstance(entry.get("file"), str) or not entry["file"].strip():
        return "bad-entry: 'file' must be a file name"
    if entry.get("style") is not None and not isinstance(entry["style"], str):
        return "bad-entry: 'style' must be a string"
    tags = entry.get("tags")
    if tags is not None and not isinstance(tags, str) and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        return "bad-entry: 'tags' must be a string or a list of strings"
    try:
        _post_id(entry.get("danbooru_id"))
    except ValueError as exc:
        return str(exc)
    return None


def _resolve(root: Path, entry: dict[str, Any], follow_symlinks: bool = False) -> Path | None:
    """The file a metadata.json entry names (its ``..`` and absolute names were refused
    already); a symlink out of the source folder only with ``follow_symlinks``."""
    name = entry["file"]
    style = str(entry.get("style") or "")
    for candidate in (root / name, root / style / name, root / style / Path(name).name):
        if not follow_symlinks and not _inside(candidate.resolve(), root):
            continue  # a symlink out of the source folder
        if candidate.is_file():
            return candidate
    return None


def scan_folder(
    source: Path,
    *,
    query: str | None,
    caption: CaptionOptions,
    follow_symlinks: bool = False,
) -> FolderScan:
    """Candidates for every image in ``source``; entries and files that cannot be imported
    are skipped into ``FolderScan.skipped``. Old-downloader entries use style → query,
    tags → caption, danbooru_id → id."""
    shown = Path(source).expanduser()
    root = shown.resolve()
    scan = FolderScan()
    claimed: set[Path] = set()
    used_ids: set[str] = set()
    entries = _load_metadata(root, shown)
    for index, entry in entries or []:
        cand = _metadata_candidate(root, entry, query, caption, follow_symlinks)
        if isinstance(cand, str):
            scan.skip(f"{shown / 'metadata.json'}: training_data[{index}]"
                      + (f" ({entry['file']})" if isinstance(entry, dict) and isinstance(entry.get("file"), str) else ""),
                      cand)
            continue
        claimed.add(Path(cand.source_path).resolve())
        if cand.id in used_ids:
            cand.id = f"local-{cand.md5[:16]}-" + hashlib.sha1(entry["file"].encode()).hexdigest()[:8]
        used_ids.add(cand.id)
        scan.candidates.append(cand)
    for path in _image_files(root, scan, follow_symlinks):
        if path.resolve() in claimed:
            continue
        rel = path.relative_to(root)
        name = query or (rel.parts[0] if entries is not None and len(rel.parts) > 1 else "import")
        text = _sidecar_caption(path, shown / rel.with_suffix(".txt"), caption, scan,
                                outside_ok=follow_symlinks, root=root)
        if text is None:
            continue
        md5 = file_digest(path, "md5")
        cand_id = f"local-{md5[:16]}"
        if cand_id in used_ids:  # a byte-identical copy: its own row, recorded as a duplicate
            cand_id += "-" + hashlib.sha1(rel.as_posix().encode()).hexdigest()[:8]
        used_ids.add(cand_id)
        tags = split_caption(text)
        if caption.trigger_word and tags[:1] == [caption.trigger_word]:
            tags = tags[1:]
        fields = {"query": name, "md5": md5, "source": f"file:{rel.as_posix()}",
                  "file_ext": path.suffix.lstrip(".").lower(), "file_size": path.stat().st_size,
                  **_danbooru_tags(TagSet(general=tags))}
        scan.candidates.append(Candidate(
            id=cand_id, query=name, md5=md5, fields=fields, source_path=str(path), caption=text,
        ))
    return scan


def _metadata_candidate(
    root: Path, entry: Any, query: str | None, caption: CaptionOptions, follow_symlinks: bool,
) -> Candidate | str:
    """The candidate for one ``metadata.json`` entry, or why it is skipped."""
    problem = _entry_problem(entry)
    if problem:
        return problem
    path = _resolve(root, entry, follow_symlinks)
    if path is None:
        return "file-not-found"
    post_id = _post_id(entry.get("danbooru_id"))
    style = entry.get("style") or query or "import"
    tagset = TagSet.from_tag_string(entry.get("tags") or "")
    md5 = file_digest(path, "md5")
    fields: dict[str, Any] = {
        "post_id": post_id, "query": style, "source": f"file:{entry['file']}", "md5": md5,
        "file_ext": path.suffix.lstrip(".").lower(), "file_size": path.stat().st_size,
        **_danbooru_tags(tagset),
    }
    return Candidate(
        id=str(post_id) if post_id is not None else f"local-{md5[:16]}", query=style, md5=md5,
        fields=fields, source_path=str(path), caption=build_caption(tagset, caption),
    )


def _sidecar_caption(image: Path, shown: Path, options: CaptionOptions, scan: FolderScan, *,
                     outside_ok: bool, root: Path) -> str | None:
    """The caption for ``image`` from its ``.txt`` (with the caption options applied), ``""``
    without one; None when the ``.txt`` cannot be read: the image is skipped, not imported
    uncaptioned (its caption would be lost without a word). A ``.txt`` that is a symlink out
    of the source folder is refused like an image symlink (it could copy any readable file
    into a caption)."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return caption_from_text("", options)
    if not outside_ok and not _inside(sidecar.resolve(), root):
        scan.skip(str(shown), "caption-symlink-out-of-source: pass --follow-symlinks to read it")
        return None
    try:
        loaded = load_caption(sidecar)
    except CaptionFileError as exc:
        scan.skip(str(shown), exc.reason)
        return None
    except OSError as exc:
        scan.skip(str(shown), f"caption-unreadable: {exc.strerror or exc}")
        return None
    scan.lenient += [(str(shown), note) for note in loaded.notes]
    return caption_from_text(loaded.text, options)


def import_folder(
    workspace: str | Path,
    name: str,
    source: str | Path,
    *,
    query: str | None = None,
    trigger_word: str | None = None,
    caption: CaptionOptions | None = None,
    min_side: int = 512,
    radius: int = 4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    follow_symlinks: bool = False,
    on_progress: ProgressCallback | None = None,
    lock_timeout: float = 0.0,
) -> RefreshSummary:
    """Import ``source`` into ``<workspace>/datasets/<name>``; writes a version if anything new is kept.

    Refused (FolderImportError): a source that is not a folder, that lies inside this data set
    (its own ``images/``) or holds it, and one with nothing to import. Hidden files, refused
    symlinks and empty folders are listed in the summary's notes.
    """
    started = time.monotonic()
    source = Path(source).expanduser()
    if not source.is_dir():
        raise FolderImportError(f"--from {source}: not a folder")
    if query is not None and (not query or any(c in query for c in "=:/ ")):
        raise FolderImportError(f"query name {query!r} must be non-empty without spaces, '=', ':' or '/'")
    paths = DatasetPaths.of(workspace, name)
    root = source.resolve()
    if _inside(root, paths.root) or _inside(paths.root, root):
        raise FolderImportError(
            f"--from {source}: this folder {'is inside' if _inside(root, paths.root) else 'contains'} "
            f"data set {name!r} ({paths.root}); importing a data set into itself would only add "
            "copies of its own images"
        )
    options_caption = caption or CaptionOptions()
    if trigger_word is not None:
        options_caption = replace(options_caption, trigger_word=trigger_word)
    options = PrepareOptions(min_side=min_side, caption=options_caption, radius=radius, max_pixels=max_pixels)
    scan = scan_folder(source, query=query, caption=options_caption, follow_symlinks=follow_symlinks)
    if not scan.candidates:
        passed = "; ".join(scan.notes() + [f"skipped {s['path']}: {s['reason']}" for s in scan.skipped[:3]])
        raise FolderImportError(
            f"--from {source}: no images to import (looked for {', '.join(sorted(IMPORT_EXTS))})"
            + (f"; {passed}" if passed else "")
        )
    paths.ensure()
    summary = RefreshSummary(dataset=name, notes=scan.notes(), skipped=list(scan.skipped))
    rows: list[dict[str, Any]] = []
    with dataset_lock(paths, timeout=lock_timeout):
        kept_before = {r["id"] for r in load_rows(paths) if r["status"] == "kept"}
        latest_before = latest_version(paths)
        recover(paths)  # also leaves out of a new version the kept images deleted by hand
        existing = load_rows(paths)
        known = KnownRows.from_rows(existing)
        kept_rows = {r["id"]: r for r in existing if r["status"] == "kept"}
        fresh: list[Candidate] = []
        seen_ids: set[str] = set()
        for cand in scan.candidates:
            if cand.id in known.final_ids:
                cand = _captioned_copy(cand, kept_rows.get(cand.id))
            if cand is None or cand.id in known.final_ids or cand.id in seen_ids:
                summary.already_seen += 1
                continue
            seen_ids.add(cand.id)
            fresh.append(cand)
        todo, duplicates = _pick_byte_identical(fresh, known.kept_md5, kept_rows)
        rows += duplicates
        rows = [r for r in rows if r["id"] not in known.final_ids]
        rows += prepare_local(paths, todo, options, on_progress)
        queries = {q: f"local:{root}" for q in sorted({c.query for c in scan.candidates})}
        result = commit(paths, rows, None, radius=radius, queries=queries, finalize=True)
        latest = latest_version(paths)
        dropped = [r["id"] for r in load_rows(paths)
                   if r["id"] in kept_before and r["status"] == "removed" and r["reason"] == FILE_MISSING]
    summary.add_rows(result.rows)
    summary.replaced += len(result.replaced)
    if dropped:
        summary.notes.append(
            f"{len(dropped)} image(s) missing from the data set's images/ (deleted by hand?) are not in "
            f"the new version and marked removed ({FILE_MISSING}): {_shown(dropped, 5)}; "
            "'animelora dataset restore' brings one back")
    summary.rounds = 1
    summary.version = result.version or (latest if latest != latest_before else None)
    summary.total_kept = result.total_kept
    summary.elapsed_s = round(time.monotonic() - started, 3)
    return summary


def _captioned_copy(cand: Candidate, kept: dict[str, Any] | None) -> Candidate | None:
    """A file the data set already holds, now with a caption the kept image lacks (the user
    added ``.txt`` files and imported again): a new candidate, so the commit keeps it in place
    of the uncaptioned image for new versions. None when there is nothing new."""
    if kept is None or has_caption(kept) or not has_caption(cand.fields):
        return None
    tag = hashlib.sha1((cand.caption or json.dumps(cand.fields, sort_keys=True, default=str)).encode())
    return replace(cand, id=f"{cand.id}-c{tag.hexdigest()[:8]}")


def _pick_byte_identical(
    candidates: list[Candidate],
    kept_md5: dict[str, str],
    kept_rows: dict[str, dict[str, Any]],
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """(candidates to prepare, duplicate rows) after exact (md5) dedup, without preparing copies.

    Of byte-identical files the one with a caption is prepared (the first when several or none
    have one), so a user's ``.txt`` is never lost to an uncaptioned copy that sorts first. A
    copy of an image the data set already holds is a duplicate of it, unless only the new copy
    has a caption: then it is prepared, and the commit keeps it in place of the old one.
    """
    groups: dict[str, list[Candidate]] = {}
    todo: list[Candidate] = []
    for cand in candidates:
        if cand.md5:
            groups.setdefault(cand.md5, []).append(cand)
        else:
            todo.append(cand)
    rows: list[dict[str, Any]] = []
    for md5, group in groups.items():
        chosen = next((c for c in group if has_caption(c.fields)), group[0])
        original = kept_md5.get(md5)
        if original and not (has_caption(chosen.fields) and not has_caption(kept_rows.get(original, {}))):
            chosen = None
        else:
            todo.append(chosen)
            original = chosen.id
        for cand in group:
            if cand is not chosen:
                rows.append(make_row(cand.id, "duplicate", cand.fields, caption=cand.caption or None,
                                 reason=f"md5-duplicate-of:{original}", duplicate_of=original))
    order = {c.id: i for i, c in enumerate(candidates)}
    todo.sort(key=lambda c: order[c.id])
    return todo, rows
