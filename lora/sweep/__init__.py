"""Sweeps: train candidate recipes rung by rung, prune the clearly worse, name the best.

Public API (the command line and the ``sweep`` flow use only this)::

    build_spec(name, preset=, base=, grid=, candidates=, rungs=) -> SweepSpec
    run_sweep(spec, workspace, train_many=train_in_process, stop_after_rungs=None) -> SweepResult
    outcome_from_run(job) -> JobOutcome      (a training that ran elsewhere, read from its run folder)

State, report and plot live in ``<workspace>/sweeps/<name>/`` (lora/sweep/state.py).
"""
from lora.sweep.plot import PLOT_FILE, plot_validation, validation_series
from lora.sweep.prune import RungDecision, judge_rung
from lora.sweep.report import render_report, report_rows
from lora.sweep.runner import (
    JobOutcome, SweepInterrupted, SweepResult, TrainJob, TrainMany, outcome_from_run, pin_dataset_version,
    run_sweep, train_in_process,
)
from lora.sweep.spec import (
    Candidate, SweepSpec, SweepSpecError, build_spec, parse_candidate, parse_grid_axis, read_spec_file,
)
from lora.sweep.state import SweepBusyError, SweepState, SweepStateError, sweep_dir

__all__ = [
    "PLOT_FILE", "Candidate", "JobOutcome", "RungDecision", "SweepBusyError", "SweepInterrupted", "SweepResult",
    "SweepSpec", "SweepSpecError", "SweepState", "SweepStateError", "TrainJob", "TrainMany",
    "build_spec", "judge_rung", "outcome_from_run", "parse_candidate", "parse_grid_axis", "pin_dataset_version", "plot_validation",
    "read_spec_file", "render_report", "report_rows", "run_sweep", "sweep_dir", "train_in_process", "validation_series",
]
