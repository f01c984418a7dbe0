"""Staging ``runs/<name>/hub/``: exactly what an upload sends, built from an allow-list.

Only these reach the folder: the LoRA files (``lora/*.safetensors``, both formats, at the repo
root so ``load_lora_weights(repo_id)`` finds them), the model card, the samples (grid, images,
``samples.json``), ``report/metrics.json`` (local paths removed) and ``report/loss_curve.png``.
Checkpoints, optimizer state, caches, ``config.json`` and anything else never do. The folder is
built under a temporary name and swapped in whole, so a failed staging leaves the previous
one intact.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora.fsutil import make_temp_dir, swap_dir
from lora.hub.card import DEFAULT_LICENSE, render_card
from lora.hub.licenses import check_license
from lora.hub.runinfo import gather, read_json
from lora.runpaths import HUB_CARD, RunPaths

log = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (".png",)


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
) -> Path:
    """Build ``run_dir/hub/`` afresh from the allow-list and return its path.

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
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise StageArgumentError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    if not run_dir.is_dir():
        raise StageError(f"{run_dir}: run folder not found")
    info = gather(run_dir, trigger_word, base_model)
    if not info.lora_files:
        raise StageError(f"{paths.lora}: no LoRA weights (*.safetensors) to publish")
    _ensure_report(run_dir)
    info = gather(run_dir, trigger_word, base_model)

    tmp = make_temp_dir(run_dir, ".hub.tmp-")
    staging = RunPaths(tmp)  # the staged folder keeps the run folder's samples/ and report/ names
    try:
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
        card = render_card(info, repo_id=repo_id, license=license,
                           has_loss_plot=plot.is_file(),
                           has_grid=staging.samples_grid.is_file())
        (tmp / HUB_CARD).write_text(card, encoding="utf-8")  # becomes paths.hub_card
        swap_dir(tmp, paths.hub)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    staged = paths.hub
    log.info("staged %d files in %s", len(staged_files(staged)), staged)
    return staged


def staged_files(hub_dir: Path | str) -> list[StagedFile]:
    """Every file in a staged folder, as the upload will send it."""
    hub_dir = Path(hub_dir)
    return [StagedFile(p.relative_to(hub_dir).as_posix(), p.stat().st_size)
            for p in sorted(hub_dir.rglob("*")) if p.is_file()]
