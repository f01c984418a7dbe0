"""A sweep's state on disk: ``<workspace>/sweeps/<name>/state.json``, and its lock.

Why on disk and not in memory or in Prefect: a sweep runs for hours and may be killed at any
point (Ctrl-C, a lost worker, a session limit). Everything the next start needs to go on
without retraining a finished rung or a pruned candidate is here: the pinned spec, each
candidate's status and the steps it reached, each rung's decision. Every change is written
whole and atomically (lora/fsutil.py), so a kill mid-write leaves the previous state.

The lock (an OS lock on ``.lock``, dropped by the OS when the process dies) keeps two sweeps of
one name from training the same run folders at once; the run folders themselves are listed in
the state when the sweep is created, and a folder that already exists then (another sweep's,
or a run of someone's) is refused, so a sweep never trains into a folder it did not create.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lora.fsutil import atomic_write_json
from lora.inputs import InputError
from lora.runpaths import REPORT_FILE as RUN_REPORT_FILE
from lora.runpaths import RunPaths
from lora.sweep.spec import SweepSpec

SWEEPS_DIR = "sweeps"
STATE_FILE = "state.json"
#: the same name as a run's report (report/report.md), so a reader finds it where they expect
REPORT_FILE = RUN_REPORT_FILE
LOCK_FILE = ".lock"
SCHEMA_VERSION = 1

LIVE = "live"
PRUNED = "pruned"
COMPLETE = "complete"
FAILED = "failed"


class SweepBusyError(InputError):
    """Another process is running this sweep (exit 2: nothing was changed)."""


class SweepStateError(InputError):
    """The sweep folder or its state cannot be used as asked (one line, exit 2)."""


def sweep_dir(workspace: Path | str, name: str) -> Path:
    return Path(workspace).expanduser().resolve() / SWEEPS_DIR / name


@dataclass
class CandidateState:
    """What one candidate has done: its status, and per rung the step it reached and its time."""

    name: str
    run_dir: str
    status: str = LIVE
    #: rung index (as text, JSON keys) -> {"step", "total_steps", "train_s", "score_step", "mean"}
    rungs: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped_at_rung: int | None = None
    reason: str | None = None

    @property
    def train_s(self) -> float:
        return float(sum(r.get("train_s") or 0.0 for r in self.rungs.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": self.run_dir, "status": self.status,
                "rungs": self.rungs, "stopped_at_rung": self.stopped_at_rung, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CandidateState":
        return cls(data["name"], data["run_dir"], data.get("status", LIVE), dict(data.get("rungs") or {}),
                   data.get("stopped_at_rung"), data.get("reason"))


@dataclass
class SweepState:
    """The whole sweep as stored; :meth:`save` writes it atomically."""

    root: Path
    spec: SweepSpec
    candidates: dict[str, CandidateState]
    #: one decision per finished rung (lora/sweep/prune.py RungDecision.to_dict())
    decisions: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def report_path(self) -> Path:
        return self.root / REPORT_FILE

    def live(self) -> list[CandidateState]:
        return [c for c in self.candidates.values() if c.status in (LIVE, COMPLETE)]

    def rungs_done(self) -> int:
        return len(self.decisions)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "spec": self.spec.to_dict(),
                "candidates": [c.to_dict() for c in self.candidates.values()],
                "decisions": self.decisions, "result": self.result}

    def save(self) -> None:
        atomic_write_json(self.path, self.to_dict())


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepStateError(f"{path}: unreadable sweep state ({exc}); move the sweep folder away "
                              "to start the sweep again") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise SweepStateError(f"{path}: not a sweep state this animelora writes")
    return data


def open_state(workspace: Path | str, spec: SweepSpec) -> SweepState:
    """The sweep's state: read back when the sweep has started before (its spec must be the
    same), else created, listing every candidate's run folder.

    Refused (nothing written): a sweep folder that holds something but no state (not ours);
    a resumed sweep with another spec; a new sweep whose run folder already exists.
    """
    root = sweep_dir(workspace, spec.name)
    path = root / STATE_FILE
    if path.is_file():
        data = _read(path)
        stored = SweepSpec.from_dict(data["spec"])
        if stored != spec:
            raise SweepStateError(
                f"sweep {spec.name} was started with other candidates, settings or rungs "
                f"(see {path}); run it again as it was, or pick another sweep name")
        cands = {c["name"]: CandidateState.from_dict(c) for c in data["candidates"]}
        return SweepState(root, stored, cands, list(data.get("decisions") or []), data.get("result"))
    if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
        raise SweepStateError(f"{root} holds files but no {STATE_FILE}: not a sweep folder animelora "
                              "made; pick another sweep name")
    cands: dict[str, CandidateState] = {}
    for cand in spec.candidates:
        run_dir = RunPaths.of(workspace, spec.run_name(cand)).root
        if run_dir.exists():
            raise SweepStateError(
                f"run folder {run_dir} already exists and is not this sweep's (candidate "
                f"{cand.name}); pick another sweep name")
        cands[cand.name] = CandidateState(cand.name, str(run_dir))
    state = SweepState(root, spec, cands)
    root.mkdir(parents=True, exist_ok=True)
    state.save()
    return state


@contextmanager
def sweep_lock(workspace: Path | str, name: str) -> Iterator[Path]:
    """Hold the sweep's lock for the ``with`` block; a second holder gets :class:`SweepBusyError`."""
    from filelock import FileLock, Timeout

    root = sweep_dir(workspace, name)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SweepBusyError(f"sweep {name} is running in another process ({root / LOCK_FILE} is "
                             "held); wait for it or stop it first") from None
    try:
        yield root
    finally:
        lock.release()
