"""Step 2 of a refresh: download (or read, for local files), prepare and caption candidates.

Everything lands in ``.staging/`` (see :mod:`lora.data.staging`); nothing enters the data set
until the commit step. A download that breaks a limit (oversized, a foreign host or scheme)
is recorded as ``rejected`` so it is never fetched again; other download errors are ``failed``
and retried by a later refresh.

Files download a few at a time (:meth:`DanbooruClient.download_many`) while this thread prepares
the ones that arrived; rows come back in the candidates' order whatever the download order, so
the commit (and the manifest) does not depend on which server answered first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lora.booru import DEFAULT_DOWNLOAD_WORKERS, DanbooruClient, DownloadError, FileJob
from lora.data.candidates import Candidate, make_row
from lora.data.captions import CaptionOptions, TagSet, build_caption, write_caption
from lora.data.images import DEFAULT_MAX_PIXELS, ImageRejected, prepare_image
from lora.data.manifest import DatasetPaths
from lora.data.staging import read_pending, staging_dir, write_pending

__all__ = [
    "ProgressCallback",
    "PrepareOptions",
    "FINAL_DOWNLOAD_REASONS",
    "download_and_prepare",
    "prepare_local",
    "shard",
]

log = logging.getLogger(__name__)

#: ``on_progress`` receives one dict per finished post:
#: ``{"stage": "download", "done": int, "total": int, "id": str, "status": str, "reason": str|None}``
ProgressCallback = Callable[[dict[str, Any]], None]


#: Download failures that will fail the same way on every later run: recorded once as
#: ``rejected`` (not ``failed``), so they are not fetched again.
FINAL_DOWNLOAD_REASONS = ("oversized", "unsupported-url-scheme", "file-host-not-allowed",
                          "too-many-redirects", "bad-file-url")


@dataclass(frozen=True)
class PrepareOptions:
    """How candidates become data-set images and captions, and how near-duplicates are judged."""

    min_side: int = 512
    max_pixels: int = DEFAULT_MAX_PIXELS
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    radius: int = 4
    group_parents: bool = False


def shard(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Split work into shards of ``size`` (the last may be smaller)."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _prepare_one(
    paths: DatasetPaths,
    candidate: Candidate,
    source: Path,
    options: PrepareOptions,
    fields: dict[str, Any],
) -> dict[str, Any]:
    prepared_dir = staging_dir(paths.prepared)
    try:
        image = prepare_image(
            source, prepared_dir / candidate.id, min_side=options.min_side, max_pixels=options.max_pixels
        )
    except ImageRejected as exc:
        return make_row(candidate.id, "rejected", fields, reason=exc.reason)
    if candidate.caption is not None:
        caption = _with_trigger(candidate.caption, options.caption.trigger_word)
    else:
        caption = build_caption(TagSet.from_post(fields), options.caption)
    write_caption(image.path.with_suffix(".txt"), caption)
    return make_row(
        candidate.id, "kept", fields,
        phash=image.phash, width=image.width, height=image.height,
        bucket=f"{image.bucket[0]}x{image.bucket[1]}", caption=caption,
        file=paths.image_entry(image.path.name),
        reason="animated-first-frame" if image.animated else None,
    )


def _with_trigger(caption: str, trigger: str | None) -> str:
    caption = caption.strip()
    if not trigger:
        return caption
    head = caption.split(",", 1)[0].strip()
    if head.casefold() == trigger.casefold():
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def download_and_prepare(
    client: DanbooruClient | None,
    paths: DatasetPaths,
    candidates: Sequence[Candidate],
    options: PrepareOptions = PrepareOptions(),
    on_progress: ProgressCallback | None = None,
    workers: int = DEFAULT_DOWNLOAD_WORKERS,
) -> list[dict[str, Any]]:
    """Download (or read, for local files), prepare and caption each candidate in ``.staging/``.

    Returns one row per candidate, in the candidates' order: ``kept`` (provisionally:
    :func:`commit` still checks phash), ``rejected`` (bad image, with the reason) or ``failed``
    (download error, with the reason). A candidate finished by an interrupted earlier run is
    re-used without a download. ``workers`` files download at once; ``on_progress`` hears of
    each candidate as it finishes.
    """
    paths.ensure()
    download_dir = staging_dir(paths.downloads)
    rows: list[dict[str, Any] | None] = [None] * len(candidates)
    done = 0

    def finish(i: int, row: dict[str, Any], fresh: bool) -> None:
        nonlocal done
        if fresh and row["status"] != "failed":
            write_pending(paths, row)
        rows[i] = row
        done += 1
        if on_progress is not None:
            candidate = candidates[i]
            on_progress({
                "stage": "download", "done": done, "total": len(candidates), "id": candidate.id,
                "query": candidate.query, "status": row["status"], "reason": row.get("reason"),
            })

    jobs: list[FileJob[int]] = []
    for i, candidate in enumerate(candidates):
        row = read_pending(paths, candidate)
        if row is not None:
            finish(i, row, fresh=False)
        elif candidate.source_path is not None:
            finish(i, _prepare_one(paths, candidate, Path(candidate.source_path), options,
                                   _next_attempt(candidate)), fresh=True)
        elif client is None or candidate.post is None:
            raise ValueError(f"candidate {candidate.id} has neither a post to download nor a local file")
        else:
            ext = (candidate.post.file_ext or "bin").lower()
            jobs.append(FileJob(i, candidate.post, download_dir / f"{candidate.id}.{ext}", candidate.md5))
    if jobs:
        assert client is not None
        for i, result in client.download_many(jobs, workers=workers):
            finish(i, _after_download(paths, candidates[i], result, options), fresh=True)
    return [row for row in rows if row is not None]


def _next_attempt(candidate: Candidate) -> dict[str, Any]:
    fields = dict(candidate.fields)
    fields["attempts"] = int(fields.get("attempts") or 0) + 1
    return fields


def _after_download(
    paths: DatasetPaths,
    candidate: Candidate,
    result: Path | DownloadError,
    options: PrepareOptions,
) -> dict[str, Any]:
    """The row of a downloaded candidate: prepared from its file, or its download error."""
    fields = _next_attempt(candidate)
    if isinstance(result, DownloadError):
        reason = result.reason or "download-failed"
        if reason.split(":", 1)[0] in FINAL_DOWNLOAD_REASONS:
            log.warning("post %s: not downloaded (%s): %s", candidate.id, reason, result)
            return make_row(candidate.id, "rejected", fields, reason=reason)
        log.info("post %s: download failed (%s)", candidate.id, reason)
        return make_row(candidate.id, "failed", fields, reason=reason)
    try:
        return _prepare_one(paths, candidate, result, options, fields)
    finally:
        try:
            result.unlink()
        except FileNotFoundError:
            pass


def prepare_local(
    paths: DatasetPaths,
    candidates: Sequence[Candidate],
    options: PrepareOptions = PrepareOptions(),
    on_progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """:func:`download_and_prepare` for local files (``Candidate.source_path``), no client."""
    return download_and_prepare(None, paths, candidates, options, on_progress)
