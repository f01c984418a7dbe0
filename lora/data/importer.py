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

from lora.data.captions import CaptionOptions, TagSet, build_caption, read_caption
from lora.data.duplicates import has_caption
from lora.data.images import DEFAULT_MAX_PIXELS
from lora.data.manifest import DatasetPaths, dataset_lock, load_rows
from lora.data.candidates import Candidate, KnownRows, make_row
from lora.data.commit import commit, recover
from lora.data.prepare import PrepareOptions, ProgressCallback, prepare_local
from lora.data.summary import RefreshSummary
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


@dataclass
class FolderScan:
    """What :func:`scan_folder` found, and what it passed over (for the summary)."""

    candidates: list[Candidate] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    hidden_skipped: int = 0
    symlinks_refused: list[str] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per thing passed over, for the summary the user reads."""
        notes = []
        if self.hidden_skipped:
            notes.append(f"skipped {self.hidden_skipped} hidden file(s) or folder(s) (names starting with '.')")
        if self.symlinks_refused:
            shown = ", ".join(self.symlinks_refused[:3]) + (" ..." if len(self.symlinks_refused) > 3 else "")
            notes.append(f"refused {len(self.symlinks_refused)} symlink(s) leading out of the source folder "
                         f"({shown}); pass --follow-symlinks to import them")
        if self.empty_folders:
            shown = ", ".join(self.empty_folders[:3]) + (" ..." if len(self.empty_folders) > 3 else "")
            notes.append(f"{len(self.empty_folders)} empty folder(s): {shown}")
        return notes


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


def _load_metadata(root: Path) -> list[dict[str, Any]] | None:
    meta = root / "metadata.json"
    if not meta.exists():
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FolderImportError(f"{meta} is not valid JSON: {exc}") from exc
    entries = data.get("training_data") if isinstance(data, dict) else None
    if entries is None:
        return None  # some other metadata.json: treat the folder as plain images
    if not isinstance(entries, list):
        raise FolderImportError(f"{meta}: 'training_data' must be a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise FolderImportError(f"{meta}: training_data[{i}] needs a 'file' string")
    return entries


def _resolve(root: Path, entry: dict[str, Any], follow_symlinks: bool = False) -> Path | None:
    """The file a metadata.json entry names, never outside the source folder: ``..`` is always
    refused, a symlink out of it only without ``follow_symlinks``."""
    name = entry["file"]
    style = str(entry.get("style") or "")
    for candidate in (root / name, root / style / name, root / style / Path(name).name):
        if not _inside(Path(os.path.normpath(candidate)), root):
            continue  # a path that climbs out of the source folder
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
    """Candidates for every image in ``source``, and rows for metadata entries whose file is
    missing. Old-downloader entries use style → query, tags → caption, danbooru_id → id."""
    root = source.resolve()
    scan = FolderScan()
    candidates = scan.candidates
    missing = scan.missing
    claimed: set[Path] = set()
    used_ids: set[str] = set()
    entries = _load_metadata(root)
    for entry in entries or []:
        style = str(entry.get("style") or query or "import")
        raw_id = entry.get("danbooru_id")
        post_id = int(raw_id) if isinstance(raw_id, int) or (isinstance(raw_id, str) and raw_id.isdigit()) else None
        path = _resolve(root, entry, follow_symlinks)
        tags = entry.get("tags") or ""
        tagset = TagSet.from_tag_string(tags if isinstance(tags, (str, list)) else str(tags))
        fields: dict[str, Any] = {"post_id": post_id, "query": style, "source": f"file:{entry['file']}",
                                  **_danbooru_tags(tagset)}
        if path is None:
            if post_id is not None:
                missing.append(make_row(str(post_id), "rejected", fields, reason="file-not-found"))
            else:
                log.warning("metadata.json entry %s: file not found, skipped", entry["file"])
            continue
        claimed.add(path.resolve())
        md5 = file_digest(path, "md5")
        cand_id = str(post_id) if post_id is not None else f"local-{md5[:16]}"
        if cand_id in used_ids:
            cand_id = f"local-{md5[:16]}-" + hashlib.sha1(entry["file"].encode()).hexdigest()[:8]
        used_ids.add(cand_id)
        fields["md5"] = md5
        fields["file_ext"] = path.suffix.lstrip(".").lower()
        fields["file_size"] = path.stat().st_size
        candidates.append(Candidate(
            id=cand_id, query=style, md5=md5, fields=fields, source_path=str(path),
            caption=build_caption(tagset, caption),
        ))
    for path in _image_files(root, scan, follow_symlinks):
        if path.resolve() in claimed:
            continue
        rel = path.relative_to(root)
        name = query or (rel.parts[0] if entries is not None and len(rel.parts) > 1 else "import")
        md5 = file_digest(path, "md5")
        cand_id = f"local-{md5[:16]}"
        if cand_id in used_ids:  # a byte-identical copy: its own row, recorded as a duplicate
            cand_id += "-" + hashlib.sha1(rel.as_posix().encode()).hexdigest()[:8]
        used_ids.add(cand_id)
        sidecar = path.with_suffix(".txt")
        text = read_caption(sidecar) if sidecar.is_file() else ""
        fields = {"query": name, "md5": md5, "source": f"file:{rel.as_posix()}",
                  "file_ext": path.suffix.lstrip(".").lower(), "file_size": path.stat().st_size}
        if text:
            fields.update(_danbooru_tags(TagSet.from_tag_string(text)))
        candidates.append(Candidate(
            id=cand_id, query=name, md5=md5, fields=fields, source_path=str(path),
            caption=text,
        ))
    return scan


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
    if not scan.candidates and not scan.missing:
        passed = "; ".join(scan.notes())
        raise FolderImportError(
            f"--from {source}: no images to import (looked for {', '.join(sorted(IMPORT_EXTS))})"
            + (f"; {passed}" if passed else "")
        )
    paths.ensure()
    summary = RefreshSummary(dataset=name, notes=scan.notes())
    rows = list(scan.missing)
    with dataset_lock(paths, timeout=lock_timeout):
        recover(paths)
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
    summary.add_rows(result.rows)
    summary.replaced += len(result.replaced)
    summary.rounds = 1
    summary.version = result.version
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
