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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from lora.data.captions import CaptionOptions, TagSet, build_caption, read_caption
from lora.data.manifest import DatasetPaths, dataset_lock, load_rows
from lora.data.refresh import (
    Candidate,
    PrepareOptions,
    ProgressCallback,
    _Known,
    _row,
    commit,
    prepare_local,
    recover,
)
from lora.data.summary import RefreshSummary
from lora.fsutil import file_digest

__all__ = ["FolderImportError", "import_folder", "scan_folder", "IMPORT_EXTS"]

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


def _image_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMPORT_EXTS:
            files.append(path)
    return files


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


def _resolve(root: Path, entry: dict[str, Any]) -> Path | None:
    name = entry["file"]
    style = str(entry.get("style") or "")
    for candidate in (root / name, root / style / name, root / style / Path(name).name):
        try:
            candidate.resolve().relative_to(root.resolve())
        except ValueError:
            continue  # refuse paths that leave the source folder
        if candidate.is_file():
            return candidate
    return None


def scan_folder(
    source: Path,
    *,
    query: str | None,
    caption: CaptionOptions,
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Candidates for every image in ``source``, and rows for metadata entries whose file is
    missing. Old-downloader entries use style → query, tags → caption, danbooru_id → id."""
    root = source.resolve()
    candidates: list[Candidate] = []
    missing: list[dict[str, Any]] = []
    claimed: set[Path] = set()
    used_ids: set[str] = set()
    entries = _load_metadata(root)
    for entry in entries or []:
        style = str(entry.get("style") or query or "import")
        raw_id = entry.get("danbooru_id")
        post_id = int(raw_id) if isinstance(raw_id, int) or (isinstance(raw_id, str) and raw_id.isdigit()) else None
        path = _resolve(root, entry)
        tags = entry.get("tags") or ""
        tagset = TagSet.from_tag_string(tags if isinstance(tags, (str, list)) else str(tags))
        fields: dict[str, Any] = {"post_id": post_id, "query": style, "source": f"file:{entry['file']}",
                                  **_danbooru_tags(tagset)}
        if path is None:
            if post_id is not None:
                missing.append(_row(str(post_id), "rejected", fields, reason="file-not-found"))
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
    for path in _image_files(root):
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
    return candidates, missing


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
    on_progress: ProgressCallback | None = None,
    lock_timeout: float = 0.0,
) -> RefreshSummary:
    """Import ``source`` into ``<workspace>/datasets/<name>``; writes a version if anything new is kept."""
    started = time.monotonic()
    source = Path(source).expanduser()
    if not source.is_dir():
        raise FolderImportError(f"--from {source}: not a folder")
    if query is not None and (not query or any(c in query for c in "=:/ ")):
        raise FolderImportError(f"query name {query!r} must be non-empty without spaces, '=', ':' or '/'")
    options_caption = caption or CaptionOptions()
    if trigger_word is not None:
        options_caption = replace(options_caption, trigger_word=trigger_word)
    options = PrepareOptions(min_side=min_side, caption=options_caption, radius=radius)
    paths = DatasetPaths.of(workspace, name).ensure()
    summary = RefreshSummary(dataset=name)
    candidates, rows = scan_folder(source, query=query, caption=options_caption)
    with dataset_lock(paths, timeout=lock_timeout):
        recover(paths)
        known = _Known.from_rows(load_rows(paths))
        todo: list[Candidate] = []
        batch_md5: dict[str, str] = {}
        seen_ids: set[str] = set()
        for cand in candidates:
            if cand.id in known.final_ids or cand.id in seen_ids:
                summary.already_seen += 1
                continue
            seen_ids.add(cand.id)
            original = known.kept_md5.get(cand.md5 or "") or batch_md5.get(cand.md5 or "")
            if original:
                rows.append(_row(cand.id, "duplicate", cand.fields,
                                 reason=f"md5-duplicate-of:{original}", duplicate_of=original))
                continue
            if cand.md5:
                batch_md5[cand.md5] = cand.id
            todo.append(cand)
        rows = [r for r in rows if r["id"] not in known.final_ids]
        rows += prepare_local(paths, todo, options, on_progress)
        queries = {q: f"local:{source.resolve()}" for q in sorted({c.query for c in candidates})}
        result = commit(paths, rows, None, radius=radius, queries=queries, finalize=True)
    summary.add_rows(result.rows)
    summary.rounds = 1
    summary.version = result.version
    summary.total_kept = result.total_kept
    summary.elapsed_s = round(time.monotonic() - started, 3)
    return summary

