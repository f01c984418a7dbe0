"""Staging ``runs/<name>/hub/``: exactly what an upload sends, built from an allow-list.

Only these reach the folder: the LoRA files (``lora/*.safetensors``, both formats, at the repo
root so ``load_lora_weights(repo_id)`` finds them), the model card, the samples (grid, images,
``samples.json``), ``report/metrics.json`` (local paths removed) and ``report/loss_curve.png``.
Checkpoints, optimizer state, caches, ``config.json`` and anything else never do. The folder is
built under a temporary name and swapped in whole, so a failed staging leaves the previous
one intact; it is replaced only when it holds nothing but an earlier staging's unchanged files
(its ledger, lora/owned.py), and the upload sends the ledger's files, never a listing.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora.owned import LEDGER, FolderKind, NotOursError, build_folder, describe_entries, foreign_entries, ledger_files
from lora.hub.card import DEFAULT_LICENSE, render_card
from lora.hub.licenses import check_license
from lora.hub.runinfo import gather, read_json
from lora.inputs import InputError, check_repo_id
from lora.runpaths import HUB_CARD, LORA_SUFFIX, SAMPLES_DIR, RunPaths

log = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (".png",)
#: ``hub/``: rebuilt whole by every publish, so it may hold only what staging wrote (lora/owned.py).
#: ``legacy``: the names staging wrote before the folder had a ledger.
_IN_HUB = RunPaths(".")  # the staged folder keeps the run folder's samples/ and report/ names
HUB_FOLDER = FolderKind("the Hub staging folder", legacy=(
    HUB_CARD, f"*{LORA_SUFFIX}", f"{SAMPLES_DIR}/*.png", f"{SAMPLES_DIR}/*/*.png",
    *(p.relative_to(_IN_HUB.root).as_posix() for p in (_IN_HUB.samples_json, _IN_HUB.metrics,
                                                       _IN_HUB.loss_plot))))
_KEEP_HINT = "to publish your own model card, pass --card FILE"


class StageError(RuntimeError):
    """The run folder cannot be staged (one-line message)."""


class StageArgumentError(StageError):
    """An argument is wrong (license, repo id, a test-model run): fix the command, not the run."""


@dataclass(frozen=True)
class StagedFile:
    path: str  # relative to hub/, with forward slashes
    size: int


def _plain_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Regular files (no symlinks) under ``folder`` with an allowed suffix."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _ensure_report(run_dir: Path) -> None:
    """Write report/ from the training log when it is missing (the card needs the metrics)."""
    paths = RunPaths(run_dir)
    if paths.metrics.exists() or not paths.log.exists():
        return
    from lora.analysis import LogError, analyze_log, write_report

    try:
        write_report(run_dir, analyze_log(run_dir))
    except LogError as exc:
        log.warning("no metrics for the model card: %s", exc)


def stage_run(
    run_dir: Path | str,
    *,
    repo_id: str,
    trigger_word: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    card: Path | str | None = None,
) -> Path:
    """Build ``run_dir/hub/`` afresh from the allow-list and return its path.

    ``hub/`` is replaced only when it holds nothing but what an earlier staging wrote,
    unchanged (:mod:`lora.owned`): a card edited there, or a note added, stops the staging with
    :class:`StageArgumentError` and is left as it is. ``card`` is a model card of the user's
    own (a markdown file), staged as the repo's README instead of the generated one.

    Checked before anything is written: the license is one of the Hub's identifiers and the
    repo id looks like USER/NAME. A run of the tiny test model may be staged (to look at), and
    its card says what it is; :func:`lora.hub.publish` refuses to upload it unless asked.
    """
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    try:
        check_license(license)
    except ValueError as exc:
        raise StageArgumentError(str(exc)) from None
    try:
        check_repo_id(repo_id)
    except InputError as exc:
        raise StageArgumentError(str(exc)) from None
    card_text = None
    if card is not None:
        try:
            card_text = Path(card).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StageArgumentError(f"--card {card}: cannot read it as UTF-8 text ({exc})") from None
    if not run_dir.is_dir():
        raise StageError(f"{run_dir}: run folder not found")
    info = gather(run_dir, trigger_word, base_model)
    if not info.lora_files:
        raise StageError(f"{paths.lora}: no LoRA weights (*.safetensors) to publish")
    _ensure_report(run_dir)
    info = gather(run_dir, trigger_word, base_model)

    try:
        with build_folder(paths.hub, HUB_FOLDER, hint=_KEEP_HINT) as tmp:
            staging = RunPaths(tmp)  # the staged folder keeps the run folder's samples/ and report/ names
            for src in info.lora_files:
                _copy(src, tmp / src.name)
            for src in _plain_files(paths.samples, SAMPLE_SUFFIXES):
                _copy(src, staging.samples / src.relative_to(paths.samples))
            meta = read_json(paths.samples_json)
            if meta is not None:
                staging.samples_json.write_text(json.dumps(meta, indent=2) + "\n")
            metrics = info.metrics
            if metrics is not None:
                metrics = {k: v for k, v in metrics.items() if k != "source"}  # no local paths
                staging.report.mkdir(exist_ok=True)
                staging.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
            plot = paths.loss_plot
            if plot.is_file() and not plot.is_symlink():
                _copy(plot, staging.loss_plot)
            if card_text is None:
                card_text = render_card(info, repo_id=repo_id, license=license,
                                        has_loss_plot=plot.is_file(),
                                        has_grid=staging.samples_grid.is_file())
            (tmp / HUB_CARD).write_text(card_text, encoding="utf-8")  # becomes paths.hub_card
    except NotOursError as exc:
        raise StageArgumentError(str(exc)) from None
    staged = paths.hub
    log.info("staged %d files in %s", len(staged_files(staged)), staged)
    return staged


def staged_files(hub_dir: Path | str) -> list[StagedFile]:
    """The files staging wrote into ``hub_dir`` (its ledger), as the upload will send them.

    The ledger, not a listing: whatever else is in the folder is never uploaded. A staged file
    changed since staging is refused, so what was shown in ``--dry-run`` is what is sent.
    """
    hub_dir = Path(hub_dir)
    foreign = foreign_entries(hub_dir, HUB_FOLDER)
    ledger = ledger_files(hub_dir)
    if foreign or ledger is None:
        raise StageError(f"{hub_dir} changed since it was staged ({describe_entries(foreign or [LEDGER])}); "
                         "run publish again to stage it afresh")
    return [StagedFile(name, (hub_dir / name).stat().st_size) for name in sorted(ledger)]
