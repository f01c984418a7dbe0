"""Hand edits of a data set: find what they broke, repair it, remove and restore images.

Why: people edit data sets by hand. They delete a bad image from ``images/``, fix a caption
in an editor, or want an image out for good. Before, one deleted image left every version
listing a file that is not there (training refuses such a version) and nothing could mend it.
Here:

- :func:`check_dataset` lists what does not agree (an image the manifest keeps that is gone, a
  caption file that differs from the manifest, a latest version that is unreadable, lists a
  missing file or a path outside the data set, or is behind the manifest); it writes nothing.
- :func:`repair_dataset` records the hand edits and writes a new, consistent version: missing
  images are marked removed (reason ``file-missing``), edited captions are taken into the
  manifest (a caption saved in Latin-1 or on several lines is rewritten as one UTF-8 line),
  a caption that is not text takes its image out (reason ``caption-not-text``).
- :func:`remove_images` takes images out (status ``removed``, reason ``removed-by-user``) and
  writes a new version; the files stay, because older versions list them and must train as
  before. A removed post is final: no refresh or import brings it back, until
- :func:`restore_images` puts it back: kept again when its file is there, else marked for the
  next fetch (its query) or import (its folder) to bring it in again.

Every change holds the data-set lock, and refs are all resolved before anything is written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lora.data.captions import CaptionFileError, load_caption, write_caption
from lora.data.commit import FILE_MISSING, finalize_version, version_change, write_kept_version
from lora.data.manifest import DatasetPaths, dataset_lock, load_rows, save_rows
from lora.data.versions import VersionError, latest_version, list_versions, next_version, read_version

__all__ = [
    "DatasetEditError",
    "Finding",
    "CheckReport",
    "EditResult",
    "check_dataset",
    "repair_dataset",
    "remove_images",
    "restore_images",
    "REMOVED_BY_USER",
]

Row = dict[str, Any]

#: Reason kind of an image taken out with ``animelora dataset remove``.
REMOVED_BY_USER = "removed-by-user"
#: Reason of a restored image whose file is gone: the next fetch or import brings it in again.
RESTORE_REQUESTED = "restore-requested"
CAPTION_NOT_TEXT = "caption-not-text"


class DatasetEditError(ValueError):
    """A remove or restore that names no such image, or a data set that cannot be edited."""


@dataclass(frozen=True)
class Finding:
    """One disagreement: ``kind``, the file the user looks at, what is wrong, the row's id."""

    kind: str
    path: str
    detail: str
    id: str | None = None


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``notes``: facts no repair can change (an older
    version listing a file that is gone stays that way; older versions are never rewritten)."""

    dataset: str
    version: str | None
    kept: int
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "version": self.version, "kept": self.kept, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings], "notes": list(self.notes)}

    def format_table(self) -> str:
        head = (f"data set {self.dataset}: latest version {self.version or 'none'}, {self.kept} kept images; "
                + ("consistent" if self.ok else f"{len(self.findings)} problem(s)"))
        lines = [head]
        lines += [f"  {f.kind}: {f.path}: {f.detail}" for f in self.findings]
        lines += [f"  note: {note}" for note in self.notes]
        if not self.ok:
            lines.append("  'animelora dataset repair' records these and writes a consistent version")
        return "\n".join(lines)


@dataclass
class EditResult:
    """What a repair, remove or restore changed: ``changed`` lists ``{"id", "file", "change"}``."""

    dataset: str
    version: str | None
    total_kept: int
    changed: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        lines = [f"data set {self.dataset}: {len(self.changed)} change(s)"]
        lines += [f"  {c['change']}: {c['id']} ({c['file']})" for c in self.changed]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  version: {self.version or 'none (nothing to write)'}; "
                     f"the data set holds {self.total_kept} images")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# check


def _caption_finding(paths: DatasetPaths, row: Row) -> Finding | None:
    """How the caption file of a kept row differs from the manifest's caption (None: it agrees).
    A missing ``.txt`` is an empty caption, as training reads it."""
    image = paths.root / row["file"]
    txt = image.with_suffix(".txt")
    recorded = (row.get("caption") or "").strip()
    if not txt.is_file():
        if not recorded:
            return None
        return Finding("caption-edited", str(txt), "caption file deleted (trains with an empty caption)", row["id"])
    try:
        loaded = load_caption(txt)
    except CaptionFileError as exc:
        return Finding(CAPTION_NOT_TEXT, str(txt), exc.reason, row["id"])
    except OSError as exc:
        return Finding(CAPTION_NOT_TEXT, str(txt), f"cannot be read: {exc.strerror or exc}", row["id"])
    if loaded.text == recorded and not loaded.notes:
        return None
    detail = f"file says {loaded.text!r}, manifest {recorded!r}" if loaded.text != recorded else "same tags"
    return Finding("caption-edited", str(txt), "; ".join([detail, *loaded.notes]), row["id"])


def _version_findings(paths: DatasetPaths, kept: Sequence[Row], has_manifest: bool) -> tuple[str | None, list[Finding]]:
    """(latest version, what is wrong with it): unreadable or a path outside the data set, a
    listed file that is gone, or (with a manifest) a list that is not the kept images."""
    latest = latest_version(paths)
    if latest is None:
        if has_manifest and kept:
            return None, [Finding("version-out-of-date", str(paths.versions),
                                  f"{len(kept)} kept image(s), no version lists them")]
        return None, []
    where = str(paths.versions / f"{latest}.json")
    try:
        files = read_version(paths, latest).get("files") or []
    except VersionError as exc:
        return latest, [Finding("version-unreadable", where, str(exc).removeprefix(where + ": "))]
    kept_ids = {r["file"]: r["id"] for r in kept}
    findings = [Finding("version-lists-missing", str(paths.root / f), f"{latest} lists it, the file is gone",
                        kept_ids.get(f))
                for f in files if not (paths.root / f).is_file()]
    if has_manifest:
        kept_files = {r["file"] for r in kept}
        behind = len(kept_files - set(files))
        extra = len(set(files) - kept_files)
        if behind or extra:
            findings.append(Finding("version-out-of-date", where,
                                    f"{behind} kept image(s) not listed, {extra} listed image(s) not kept"))
    return latest, findings


def _older_version_notes(paths: DatasetPaths, latest: str | None) -> list[str]:
    notes = []
    for name in list_versions(paths):
        if name == latest:
            continue
        try:
            files = read_version(paths, name).get("files") or []
        except VersionError as exc:
            notes.append(f"older version {name} cannot be read ({exc})")
            continue
        gone = [f for f in files if not (paths.root / f).is_file()]
        if gone:
            notes.append(f"older version {name} lists {len(gone)} file(s) that are gone (e.g. {gone[0]}); "
                         "it cannot be trained any more")
    return notes


def check_dataset(paths: DatasetPaths, rows: list[Row] | None = None) -> CheckReport:
    """What in ``paths`` disagrees (see the module docstring); reads only."""
    if not paths.root.is_dir():
        raise DatasetEditError(f"data set {paths.name!r}: no such folder {paths.root}")
    has_manifest = paths.manifest.exists()
    rows = load_rows(paths) if rows is None else rows
    kept = [r for r in rows if r["status"] == "kept"]
    latest, findings = _version_findings(paths, kept, has_manifest)
    listed_missing = {f.path for f in findings}
    for row in kept:
        image = paths.root / row["file"]
        if not image.is_file():
            if str(image) not in listed_missing:
                findings.append(Finding("missing-image", str(image), "the manifest keeps it, the file is gone", row["id"]))
            continue
        finding = _caption_finding(paths, row)
        if finding is not None:
            findings.append(finding)
    return CheckReport(paths.name, latest, len(kept), findings,
                       _older_version_notes(paths, latest) + _unlisted_notes(paths, rows))


def _unlisted_notes(paths: DatasetPaths, rows: list[Row]) -> list[str]:
    """Files in ``images/`` that no manifest row names (put there by hand): never deleted, in no version."""
    named = {Path(r["file"]).name for r in rows if r.get("file")}
    named_stems = {Path(n).stem for n in named}
    if not paths.images.is_dir():
        return []
    stray = sorted(p.name for p in paths.images.iterdir() if p.is_file()
                   and not (p.stem in named_stems if p.suffix == ".txt" else p.name in named))
    if not stray:
        return []
    shown = ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
    return [f"{len(stray)} file(s) in images/ that no manifest row names ({shown}): in no version and "
            "never deleted; to add images, put them in a folder and run 'animelora import --from' it"]


# --------------------------------------------------------------------------------------------
# changes


def _new_version(paths: DatasetPaths, rows: list[Row], changed: list[dict[str, str]], why: str) -> str:
    """A new version of the kept rows, recording what changed since the last one and why."""
    version = next_version(paths)
    write_kept_version(paths, version, rows, extra={"added": 0, "reason": why, "changes": changed})
    return version


def _result(paths: DatasetPaths, rows: list[Row], version: str | None, changed: list[dict[str, str]],
            notes: list[str] | None = None) -> EditResult:
    return EditResult(paths.name, version, sum(1 for r in rows if r["status"] == "kept"), changed, notes or [])


def _need_manifest(paths: DatasetPaths) -> None:
    if not paths.manifest.exists():
        raise DatasetEditError(
            f"data set {paths.name!r} has no {paths.manifest.name} ({paths.root}): only data sets made by "
            "'animelora fetch' or 'animelora import' can be edited")


def repair_dataset(paths: DatasetPaths, *, lock_timeout: float = 0.0) -> EditResult:
    """Record hand edits and write one new, consistent version (nothing to do: no version).

    When a crash left a version unwritten, that version is the one written (as the next
    refresh would), with the edits recorded."""
    _need_manifest(paths)
    with dataset_lock(paths, timeout=lock_timeout):
        rows = load_rows(paths)
        report = check_dataset(paths, rows)
        changed = _record_findings(paths, rows, report)
        if changed:
            save_rows(paths, rows)
        version = finalize_version(paths, rows=rows)  # a version a crash left waiting, if any
        if version is None and not report.ok:
            version = _new_version(paths, rows, changed, "repair")
        notes = [f"superseded {f.path}: {f.detail}" for f in report.findings if f.kind == "version-unreadable"]
        if report.ok:
            notes.append(f"wrote {version}, the version its kept images were waiting for" if version
                         else "nothing to repair")
        return _result(paths, rows, version, changed, notes)


def _record_findings(paths: DatasetPaths, rows: list[Row], report: CheckReport) -> list[dict[str, str]]:
    """Take the check's findings into ``rows`` (in place): missing images and captions that are
    not text are marked removed, edited captions recorded. Returns the version's changes."""
    index = {r["id"]: i for i, r in enumerate(rows)}
    changed: list[dict[str, str]] = []
    for finding in report.findings:
        i = index.get(finding.id) if finding.id else None
        if i is None:
            continue
        row = rows[i]
        if finding.kind in ("missing-image", "version-lists-missing"):
            rows[i] = dict(row, status="removed", reason=FILE_MISSING)
            changed.append(version_change(row, f"removed ({FILE_MISSING})"))
        elif finding.kind == CAPTION_NOT_TEXT:
            rows[i] = dict(row, status="removed", reason=CAPTION_NOT_TEXT)
            changed.append(version_change(row, f"removed ({CAPTION_NOT_TEXT}: fix {finding.path} and restore it)"))
        elif finding.kind == "caption-edited":
            rows[i] = dict(row, caption=_take_caption(paths, row))
            changed.append(version_change(row, "caption recorded"))
    return changed


def _take_caption(paths: DatasetPaths, row: Row) -> str:
    """The caption file's text, for the manifest; a file read leniently (Latin-1, several
    lines) is rewritten as the one UTF-8 line training and kohya read."""
    txt = (paths.root / row["file"]).with_suffix(".txt")
    if not txt.is_file():
        return ""
    loaded = load_caption(txt)
    if loaded.notes:
        write_caption(txt, loaded.text)
    return loaded.text


def _resolve_refs(rows: list[Row], refs: Iterable[str]) -> list[int]:
    """Row indexes for ``refs`` (an id, a file ``images/<name>``, or its name with or without
    extension); every ref must match, else DatasetEditError naming those that do not."""
    by_key: dict[str, int] = {}
    for i, row in enumerate(rows):
        by_key.setdefault(row["id"], i)
        if row.get("file"):
            for key in (row["file"], Path(row["file"]).name, Path(row["file"]).stem):
                by_key.setdefault(key, i)
    refs = [r.strip() for r in refs if r.strip()]
    if not refs:
        raise DatasetEditError("name at least one image (its id or file name)")
    unknown = [r for r in refs if r not in by_key]
    if unknown:
        raise DatasetEditError(f"no such image in the data set: {', '.join(unknown)} (nothing was changed)")
    return sorted({by_key[r] for r in refs})


def remove_images(paths: DatasetPaths, refs: Sequence[str], *, reason: str | None = None,
                  lock_timeout: float = 0.0) -> EditResult:
    """Take kept images out of the data set and write a new version without them."""
    _need_manifest(paths)
    if reason is not None and ("\n" in reason or not reason.strip()):
        raise DatasetEditError("--reason must be one non-empty line")
    why = REMOVED_BY_USER + (f":{reason.strip()}" if reason else "")
    with dataset_lock(paths, timeout=lock_timeout):
        rows = load_rows(paths)
        finalize_version(paths, rows=rows)
        picked = _resolve_refs(rows, refs)
        not_kept = [rows[i] for i in picked if rows[i]["status"] not in ("kept", "removed")]
        if not_kept:
            raise DatasetEditError("not images of the data set: " + ", ".join(
                f"{r['id']} ({r['status']}{': ' + r['reason'] if r.get('reason') else ''})" for r in not_kept)
                + " (nothing was changed)")
        changed, notes = [], []
        for i in picked:
            row = rows[i]
            if row["status"] == "removed":
                notes.append(f"{row['id']} was removed already ({row.get('reason')})")
                continue
            rows[i] = dict(row, status="removed", reason=why)
            changed.append(version_change(row, f"removed ({why})"))
        if not changed:
            return _result(paths, rows, None, [], notes)
        save_rows(paths, rows)
        notes.append("the files stay on disk: older versions list them")
        return _result(paths, rows, _new_version(paths, rows, changed, "remove"), changed, notes)


def restore_images(paths: DatasetPaths, refs: Sequence[str], *, lock_timeout: float = 0.0) -> EditResult:
    """Undo :func:`remove_images` (or a ``file-missing`` repair): an image whose file is there
    is kept again (new version); one whose file is gone is left for the next fetch or import."""
    _need_manifest(paths)
    with dataset_lock(paths, timeout=lock_timeout):
        rows = load_rows(paths)
        finalize_version(paths, rows=rows)
        picked = _resolve_refs(rows, refs)
        wrong = [rows[i] for i in picked if rows[i]["status"] not in ("removed", "kept")]
        if wrong:
            raise DatasetEditError("only removed images can be restored: " + ", ".join(
                f"{r['id']} is {r['status']}" for r in wrong) + " (nothing was changed)")
        changed, notes, later = [], [], []
        for i in picked:
            row = rows[i]
            if row["status"] == "kept":
                notes.append(f"{row['id']} is in the data set already")
                continue
            image = paths.root / (row.get("file") or "")
            if row.get("file") and image.is_file() and _caption_ok(image):
                rows[i] = dict(row, status="kept", reason=None)
                changed.append(version_change(row, "restored"))
            else:
                # failed with no attempts: the next fetch retries the download, the next import
                # of its folder prepares the file again (neither treats it as seen)
                rows[i] = dict(row, status="failed", reason=RESTORE_REQUESTED, attempts=0)
                later.append(row["id"])
        if later:
            notes.append(f"{len(later)} image(s) have no file any more ({', '.join(later[:5])}): the next "
                         "'animelora fetch' of their query or 'animelora import' of their folder brings them back")
        if changed or later:
            save_rows(paths, rows)
        version = _new_version(paths, rows, changed, "restore") if changed else None
        return _result(paths, rows, version, changed, notes)


def _caption_ok(image: Path) -> bool:
    """A caption that can be read (or none): an image removed for its caption stays out until
    the caption is fixed."""
    txt = image.with_suffix(".txt")
    try:
        if txt.is_file():
            load_caption(txt)
    except (CaptionFileError, OSError):
        return False
    return True
