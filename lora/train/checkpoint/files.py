"""Checkpoints: ``checkpoints/step-<n>/`` written atomically and verified by checksums.

Each checkpoint holds the trainable (LoRA) weights, optimizer and scheduler state, RNG
states, the trainer state (step/epoch counters, data-order position, fp16's loss scale), the
recipe that trained the weights (``recipe.json``: :func:`lora.config.recipe`) and the training
log so far. Files go to a hidden temporary folder first; ``checkpoint.json`` with the sha256 of
every file is written last, then the folder is renamed into place. A folder without a
matching ``checkpoint.json`` is partial or damaged: resuming skips it with a warning and
takes the previous one. A write that fails (a full disk) removes its temporary folder, so the
space is free again for the next attempt, and says what happened in words.

This module is the only reader and writer of these files: the run gets a typed
:class:`CheckpointData` back.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from lora.fsutil import atomic_write_json, file_digest, fsync_path, swap_dir
from lora.runpaths import LOG_FILE
from lora.train.errors import TrainingError

from .state import RunState

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
FORMAT = 1
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_TORCH = "rng.pt"
RNG_JSON = "rng.json"
STATE = "state.json"
RECIPE = "recipe.json"
#: A checkpoint holds the run's training log as of its step, under the run's own name for it.
LOG = LOG_FILE


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename over ``path``."""
    atomic_write_json(path, data, indent=1, mode=0o666)


def rng_snapshot() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, torch/cuda states)."""
    py = random.getstate()
    np_state = np.random.get_state()
    as_json = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return as_json, tensors


def rng_restore(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = as_json["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = as_json["numpy"]
    np.random.set_state((npv[0], np.array(npv[1], dtype=np.uint32), npv[2], npv[3], npv[4]))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` for every ``step-<n>`` folder, newest first (valid or not)."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), key=lambda sp: sp[0], reverse=True)


def verify(folder: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (partial write)"
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({exc.__class__.__name__})"
    if data.get("format") != FORMAT or data.get("step") != step_of(folder):
        return f"{MANIFEST} does not match the folder"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if file_digest(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def latest_valid(root: Path) -> Path | None:
    """The newest intact checkpoint; damaged or partial ones are skipped with a warning."""
    for step, folder in list_checkpoints(root):
        reason = verify(folder)
        if reason is None:
            return folder
        log.warning("skipping checkpoint %s: %s; trying the previous one", folder.name, reason)
    return None


@dataclass
class CheckpointData:
    """A checkpoint as the run resumes it."""

    folder: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_json: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    run: RunState
    #: fp16's loss scale (``GradScaler.state_dict()``'s keys); None: bf16/fp32, or a checkpoint before it
    loss_scale: dict[str, Any] | None
    #: the settings that trained the weights; None for a checkpoint written before it was recorded
    recipe: dict[str, Any] | None
    log: dict[str, Any]


def load_checkpoint(folder: Path) -> CheckpointData:
    state = json.loads((folder / STATE).read_text())
    recipe = folder / RECIPE
    return CheckpointData(
        folder=folder,
        trainable=load_file(str(folder / WEIGHTS)),
        optimizer=torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True),
        scheduler=torch.load(folder / SCHEDULER, map_location="cpu", weights_only=True),
        rng_json=json.loads((folder / RNG_JSON).read_text()),
        rng_tensors=torch.load(folder / RNG_TORCH, map_location="cpu", weights_only=True),
        run=RunState.from_checkpoint(state),
        loss_scale=state.get("loss_scale") or None,
        recipe=json.loads(recipe.read_text()) if recipe.is_file() else None,
        log=json.loads((folder / LOG).read_text()),
    )


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (its partial folder is gone again)."""


def _torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: the file is then written like every other one, so a failed
    write is an ``OSError`` with its errno (torch's own file writer reports a full disk only as
    ``[enforce fail at inline_container.cc] unexpected pos``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Every file of a checkpoint is written here (files follow the umask, unlike save_file's 0600)."""
    with open(path, "wb") as f:
        f.write(data)


def _files(trainable: dict[str, torch.Tensor], optimizer: dict[str, Any], scheduler: dict[str, Any],
           state: dict[str, Any], recipe: dict[str, Any] | None, log_data: dict[str, Any]) -> dict[str, bytes]:
    """The checkpoint's files, in the order they are written."""
    rng_json, rng_tensors = rng_snapshot()
    files = {
        WEIGHTS: save({k: v.detach().cpu().contiguous() for k, v in trainable.items()}),
        OPTIMIZER: _torch_bytes(optimizer),
        SCHEDULER: _torch_bytes(scheduler),
        RNG_TORCH: _torch_bytes(rng_tensors),
        RNG_JSON: json.dumps(rng_json).encode(),
        STATE: json.dumps(state, indent=1).encode(),
        LOG: json.dumps(log_data, indent=1).encode(),
    }
    if recipe is not None:
        files[RECIPE] = json.dumps(recipe, indent=1).encode()
    return files


def write_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    run: RunState,
    loss_scale: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    log_data: dict[str, Any],
) -> Path:
    """Write ``root/step-<step>`` atomically; an existing folder of that step is replaced.

    Any failure removes the temporary folder again (a full disk stays full otherwise, and the
    next resume fails too) and raises :class:`CheckpointWriteError`, in words for a full disk."""
    state = run.to_checkpoint()
    if loss_scale is not None:
        state["loss_scale"] = loss_scale
    files = _files(trainable, optimizer, scheduler, state, recipe, log_data)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_folder(tmp, files, step)
        final = root / f"step-{step}"
        swap_dir(tmp, final, old=root / f".old-step-{step}-{os.getpid()}")
        fsync_path(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointWriteError(_write_failure(exc, root, step)) from None
        raise
    return final


def _write_folder(tmp: Path, files: dict[str, bytes], step: int) -> None:
    for name, data in files.items():
        _write(tmp / name, data)
        fsync_path(tmp / name)
    manifest = {
        "format": FORMAT,
        "step": step,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: file_digest(tmp / name) for name in files},
    }
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)


def _write_failure(exc: OSError, root: Path, step: int) -> str:
    """One line: what failed, in words, and that nothing was left behind."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full (no space left on the device" + (" within your quota)" if exc.errno == errno.EDQUOT else ")")
    else:
        what = exc.strerror or str(exc)
    return (f"cannot write the checkpoint of step {step} in {root}: {what}; the partial checkpoint was "
            "removed. Free some space and re-run to resume from the last checkpoint")


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` intact checkpoints; remove older ones and leftover temp folders."""
    kept = 0
    for step, folder in list_checkpoints(root):
        if kept >= keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif verify(folder) is None:
            kept += 1
    clean_temporaries(root)


def clean_temporaries(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)
