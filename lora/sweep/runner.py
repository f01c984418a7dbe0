"""Run a sweep: train the live candidates rung by rung, prune the clearly worse, name the best.

Each candidate is an ordinary run folder ``<workspace>/runs/<sweep>-<candidate>``: rung ``r``
trains it to the end of epoch ``rungs[r]`` (``stop_at_step``; the trainer stops there with a
checkpoint, after its end-of-epoch validation), the next rung resumes it from that checkpoint,
and the last rung trains it to its end (LoRA files written). Between rungs the candidates are
judged on the validation record the trainer logged at the rung's step (lora/sweep/prune.py).

How a rung's trainings run is a parameter (:data:`TrainMany`): in this process one after the
other (:func:`train_in_process`, the command line), or as Prefect child flow runs under the GPU
limit, in the sweep's process or on other workers at once (flows/sweep.py). Everything else, and
the state on disk, is the same either way. A training that ran in another process is read back
from its run folder (:func:`outcome_from_run`), so no result has to travel between machines.

A candidate whose run already reached the rung's stop step (it trained there before the sweep
was stopped, but its outcome was never recorded) is recorded from its run folder, its time
included, and not handed to a training again: no model is loaded and no worker taken for it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from lora.analysis.paired import Scores, paired_compare, scores_from_log
from lora.config import TrainConfig
from lora.runpaths import RunPaths
from lora.sweep.prune import RungDecision, judge_rung, tie_groups
from lora.sweep.report import write_report
from lora.sweep.spec import SweepSpec
from lora.sweep.state import COMPLETE, FAILED, LIVE, PRUNED, CandidateState, SweepState, open_state, sweep_lock

log = logging.getLogger(__name__)


class SweepInterrupted(RuntimeError):
    """A training was stopped by Ctrl-C / SIGTERM: its checkpoint and the sweep's state are on
    disk; running the sweep again continues."""


@dataclass(frozen=True)
class TrainJob:
    """One candidate's training for one rung: resume ``run_dir`` and stop at ``stop_at_step``
    (None: train to the end of the run)."""

    candidate: str
    rung: int
    config: TrainConfig
    run_dir: Path
    stop_at_step: int | None
    #: the step this rung trains from (the previous rung's); its training time is the segments after it
    from_step: int = 0


@dataclass(frozen=True)
class JobOutcome:
    """What a job reached; ``error`` (one line) when the training failed (divergence, ...)."""

    global_step: int
    total_steps: int
    complete: bool
    stopped_reason: str
    train_s: float
    error: str | None = None


TrainMany = Callable[[list[TrainJob]], dict[str, JobOutcome]]


def train_in_process(jobs: list[TrainJob]) -> dict[str, JobOutcome]:
    """Each job in this process, one after the other (the command line's way)."""
    from lora.train import TrainingError, train

    out: dict[str, JobOutcome] = {}
    for job in jobs:
        started = time.monotonic()
        try:
            result = train(job.config, job.run_dir, stop_at_step=job.stop_at_step)
        except TrainingError as exc:  # diverged, or out of memory even at half the batch
            step = RunPaths(job.run_dir).global_step()
            out[job.candidate] = JobOutcome(step, 0, False, "failed", time.monotonic() - started,
                                            " ".join(str(exc).split())[:300])
            continue
        out[job.candidate] = JobOutcome(result.global_step, result.total_steps, result.complete,
                                        result.stopped_reason, time.monotonic() - started)
        if result.stopped_reason == "interrupted":
            break  # the process is being stopped: no further training
    return out


def checkpoint_step(run_dir: Path | str) -> int:
    """The step of the run's newest intact checkpoint, where a training resumes (0: none)."""
    from lora.train.checkpoint import latest_valid, step_of

    found = latest_valid(RunPaths(Path(run_dir)).checkpoints)
    return (step_of(found) or 0) if found is not None else 0


def already_reached(job: TrainJob) -> bool:
    """The job's run is already where the job would take it (trained there before a stop)."""
    if job.stop_at_step is None:
        return RunPaths(job.run_dir).is_complete()
    return checkpoint_step(job.run_dir) >= job.stop_at_step


def segments_train_s(run_dir: Path | str, after_step: int) -> float:
    """Wall time of the run's training segments that trained steps after ``after_step``, set-up
    included (a segment holds its GPU slot for all of it): one rung's GPU time, from the log."""
    logged = RunPaths(Path(run_dir)).read_log() or {}
    total = 0.0
    for seg in logged.get("segments") or []:
        if not isinstance(seg, Mapping):
            continue
        try:
            if int(seg.get("last_step") or 0) > after_step:
                total += float(seg.get("wall_s") or 0.0)
        except (TypeError, ValueError):
            continue
    return total


def outcome_from_run(job: TrainJob, error: str | None = None) -> JobOutcome:
    """What ``job`` reached, read from its run folder: for a training that ran in another process
    or on another machine (a Prefect deployment run), or before the sweep was stopped.

    Not at its target without an ``error`` means the training was stopped early (its worker
    was stopped or lost): ``interrupted``, so the sweep stops resumably."""
    paths = RunPaths(job.run_dir)
    logged = paths.read_log() or {}
    step, complete = paths.global_step(), paths.is_complete()
    total = logged.get("total_steps")
    total = total if isinstance(total, int) and not isinstance(total, bool) else 0
    target = job.stop_at_step if job.stop_at_step is not None else total
    if error is not None:
        reason = "failed"
    elif complete:
        reason = "complete"
    else:
        reason = "step-target" if 0 < target <= step else "interrupted"
    return JobOutcome(step, total, complete, reason, segments_train_s(job.run_dir, job.from_step), error)


@dataclass(frozen=True)
class SweepResult:
    """How the call ended (``complete`` or ``stopped`` after ``stop_after_rungs``) and the state."""

    status: str
    state: SweepState

    @property
    def best(self) -> str | None:
        return (self.state.result or {}).get("best")

    @property
    def ranking(self) -> list[str]:
        return [r["candidate"] for r in (self.state.result or {}).get("ranking", [])]

    def _plot(self) -> str | None:
        from lora.sweep.plot import PLOT_FILE

        path = self.state.root / PLOT_FILE
        return str(path) if path.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "sweep": self.state.spec.name, "sweep_dir": str(self.state.root),
                "report": str(self.state.report_path), "plot": self._plot(), "rungs_done": self.state.rungs_done(),
                "rungs": len(self.state.spec.rungs) + 1, **(self.state.result or {})}


def rung_epochs(spec: SweepSpec) -> list[int | None]:
    """The rungs' epochs, then None: the end of each candidate's run."""
    return [*spec.rungs, None]


def stop_step(cfg: TrainConfig, run_dir: Path, epoch: int | None) -> int | None:
    """The step at the end of ``epoch`` for this recipe, or None when that is the run's end."""
    from lora.train import make_plan

    if epoch is None:
        return None
    plan = make_plan(cfg, run_dir=run_dir)  # a started run keeps the split it recorded
    step = epoch * plan.steps_per_epoch
    return None if step >= plan.total_steps else step


def scores_at(run_dir: Path | str, label: str, step: int) -> Scores | None:
    """The run's per-image validation losses at ``step`` (the latest record at or before it)."""
    logged = RunPaths(Path(run_dir)).read_log()
    if logged is None:
        return None
    records = [r for r in logged.get("validation") or []
               if isinstance(r, Mapping) and isinstance(r.get("step"), (int, float)) and 0 < r["step"] <= step]
    return scores_from_log({**logged, "validation": records}, label, "final")


def pin_dataset_version(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``dataset_version`` set to the data set's latest version when not given, so
    every candidate (and a resumed sweep) trains on the same images although the data set grows."""
    if base.get("dataset_version") or not base.get("dataset"):
        return base
    from lora.data.manifest import DatasetPaths
    from lora.data.versions import latest_version

    version = latest_version(DatasetPaths(Path(base["dataset"])))
    return {**base, "dataset_version": version} if version else base


class _Sweep:
    """One call of :func:`run_sweep`, with its state held."""

    def __init__(self, state: SweepState, train_many: TrainMany) -> None:
        self.state, self.spec, self.train_many = state, state.spec, train_many

    def run_rung(self, rung: int, epoch: int | None) -> RungDecision:
        jobs = []
        for job in self._jobs(rung, epoch):
            if already_reached(job):
                log.info("sweep %s: %s reached rung %d before the sweep was stopped; not trained again",
                         self.spec.name, job.candidate, rung + 1)
                self._record(job, outcome_from_run(job))
            else:
                jobs.append(job)
        if jobs:
            log.info("sweep %s rung %d (%s): training %s", self.spec.name, rung + 1,
                     f"epoch {epoch}" if epoch else "to the end", ", ".join(j.candidate for j in jobs))
            outcomes = self.train_many(jobs)
            for job in jobs:
                if job.candidate in outcomes:
                    self._record(job, outcomes[job.candidate])
            self.state.save()
            if any(o.stopped_reason == "interrupted" for o in outcomes.values()) or len(outcomes) < len(jobs):
                raise SweepInterrupted(f"sweep {self.spec.name} was interrupted in rung {rung + 1} "
                                       "(checkpoints and state saved); run it again to continue")
        return self._judge(rung, epoch)

    def _jobs(self, rung: int, epoch: int | None) -> list[TrainJob]:
        jobs = []
        for cand in self.state.live():
            done = cand.rungs.get(str(rung))
            if done is not None and (done.get("reached") or cand.status == COMPLETE):
                continue  # this rung was trained before the sweep was stopped
            if cand.status == COMPLETE:
                last = max(cand.rungs.values(), key=lambda r: r["step"])
                cand.rungs[str(rung)] = {**last, "train_s": 0.0, "reached": True}
                continue
            cfg = self.spec.config(self.spec.candidate(cand.name))
            before = cand.rungs.get(str(rung - 1)) or {}
            jobs.append(TrainJob(cand.name, rung, cfg, Path(cand.run_dir), stop_step(cfg, Path(cand.run_dir), epoch),
                                 from_step=int(before.get("step") or 0)))
        return jobs

    def _record(self, job: TrainJob, outcome: JobOutcome) -> None:
        cand = self.state.candidates[job.candidate]
        if outcome.error is not None:
            cand.status, cand.stopped_at_rung, cand.reason = FAILED, job.rung, outcome.error
            log.warning("sweep %s: candidate %s failed: %s", self.spec.name, cand.name, outcome.error)
        target = job.stop_at_step if job.stop_at_step is not None else outcome.total_steps
        reached = outcome.error is None and (outcome.complete or outcome.global_step >= target)
        cand.rungs[str(job.rung)] = {"step": outcome.global_step, "total_steps": outcome.total_steps,
                                     "train_s": round(outcome.train_s, 3), "reached": reached}
        if outcome.complete:
            cand.status = COMPLETE
        self.state.save()

    def _judge(self, rung: int, epoch: int | None) -> RungDecision:
        live = self.state.live()
        scores = {c.name: scores_at(c.run_dir, c.name, c.rungs[str(rung)]["step"]) for c in live}
        decision = judge_rung(rung, epoch, scores)
        final = epoch is None
        for cand in live:
            record = cand.rungs[str(rung)]
            record["mean"] = decision.means.get(cand.name)
            pair = decision.vs_best.get(cand.name)
            record["vs_best"] = pair.to_dict() if pair is not None else None
            if not final and cand.name in decision.pruned:
                cand.status, cand.stopped_at_rung = PRUNED, rung
                cand.reason = f"clearly worse than {decision.best} at rung {rung + 1}: {pair.figure()}"
                log.info("sweep %s: pruned %s (%s)", self.spec.name, cand.name, cand.reason)
        self.state.decisions.append(decision.to_dict())
        self.state.save()
        return decision


def _ranking(state: SweepState) -> list[dict[str, Any]]:
    """Survivors by final mean, then pruned (later rung first, then mean), then failed."""
    def last_mean(c: CandidateState) -> float:
        means = [r.get("mean") for _, r in sorted(c.rungs.items(), key=lambda kv: int(kv[0]))
                 if r.get("mean") is not None]
        return means[-1] if means else float("inf")

    def key(c: CandidateState) -> tuple:
        order = {COMPLETE: 0, LIVE: 0, PRUNED: 1, FAILED: 2}[c.status]
        return (order, -(c.stopped_at_rung or 0), last_mean(c), c.name)

    return [{"candidate": c.name, "status": c.status, "mean": last_mean(c) if last_mean(c) != float("inf") else None,
             "stopped_at_rung": c.stopped_at_rung, "reason": c.reason}
            for c in sorted(state.candidates.values(), key=key)]


def _seconds_per_step(cand: CandidateState, steps: int) -> float:
    """The candidate's training time per step without set-up (model load, the latent cache,
    which the first candidate builds for all): from its log's segment records when they say,
    else its whole time per step."""
    logged = RunPaths(Path(cand.run_dir)).read_log() or {}
    segments = [s for s in logged.get("segments") or [] if isinstance(s, Mapping)]
    try:
        busy = sum(float(s["wall_s"]) - float(s.get("setup_s") or 0.0) for s in segments)
    except (KeyError, TypeError, ValueError):
        busy = 0.0
    return (busy if busy > 0 else cand.train_s) / steps


def _gpu_time(state: SweepState) -> dict[str, float]:
    """Training time spent, and an estimate of the time pruning saved: each pruned candidate's
    remaining steps at the rate it trained at."""
    spent = sum(c.train_s for c in state.candidates.values())
    saved = 0.0
    for cand in state.candidates.values():
        if cand.status != PRUNED or not cand.rungs:
            continue
        last = max(cand.rungs.values(), key=lambda r: r["step"])
        if last["step"] > 0 and last.get("total_steps"):
            saved += _seconds_per_step(cand, last["step"]) * (last["total_steps"] - last["step"])
    return {"spent_s": round(spent, 1), "saved_s": round(saved, 1)}


def finish(state: SweepState) -> dict[str, Any]:
    """The sweep's result: the best with its interval against each survivor, the groups, times."""
    final = state.decisions[-1]
    survivors = [c for c in state.live()]
    scores = {c.name: scores_at(c.run_dir, c.name, c.rungs[str(final["rung"])]["step"]) for c in survivors}
    scored = {n: s for n, s in scores.items() if s is not None}
    order = sorted(scored, key=lambda n: (scored[n].mean, n))
    best = final.get("best")
    distinct = bool(best) and all(
        paired_compare(scored[n], scored[best]).verdict == "b better" for n in order if n != best)
    groups = tie_groups(order, scored) if scored else []
    result = {"best": best, "best_distinguishable": distinct, "groups": groups,
              "ranking": _ranking(state), "gpu_time": _gpu_time(state),
              "best_run_dir": state.candidates[best].run_dir if best else None}
    state.result = result
    state.save()
    return result


def run_sweep(spec: SweepSpec, workspace: Path | str, *, train_many: TrainMany = train_in_process,
              stop_after_rungs: int | None = None,
              on_rung: Callable[[RungDecision, SweepState], None] | None = None) -> SweepResult:
    """Run (or resume) the sweep ``spec`` in ``workspace`` until it is complete, or until
    ``stop_after_rungs`` rungs are done in all (then status ``stopped``; run again to go on).

    ``on_rung`` is told each rung's decision once its state and report are written (progress,
    artifacts).
    Raises :class:`~lora.sweep.state.SweepBusyError` when another process runs the sweep and
    :class:`SweepInterrupted` after Ctrl-C / SIGTERM (state saved either way)."""
    with sweep_lock(workspace, spec.name):
        state = open_state(workspace, spec)
        sweep = _Sweep(state, train_many)
        for rung, epoch in enumerate(rung_epochs(spec)):
            if rung < state.rungs_done():
                continue
            if stop_after_rungs is not None and rung >= stop_after_rungs:
                write_report(state)
                return SweepResult("stopped", state)
            decision = sweep.run_rung(rung, epoch)
            write_report(state)  # report and plot after every rung: a long sweep shows where it is
            if on_rung is not None:
                on_rung(decision, state)
        if state.result is None:
            finish(state)
        write_report(state)
        return SweepResult("complete", state)
