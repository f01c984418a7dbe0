"""The training engine: data plan, caches, seeded loop, checkpoints, validation and logs.

Public API (used by ``animelora.commands.train`` and the Prefect tasks, one call per segment)::

    train(cfg, run_dir, *, stop_at_step=None, time_budget_s=None, on_progress=None, extend=False) -> TrainResult
    plan_total_steps(cfg, dataset_dir=None) -> int
"""
from .dataset import DatasetError
from .loop import NonFiniteLossError, TrainingError, TrainResult, lora_files, train
from .step import FAKE_OOM_ENV
from .plan import DataPlan, make_plan, plan_total_steps
from .runfolder import RunFolderError

__all__ = [
    "DataPlan", "DatasetError", "FAKE_OOM_ENV", "NonFiniteLossError", "RunFolderError", "TrainResult",
    "TrainingError",
    "lora_files", "make_plan", "plan_total_steps", "train",
]
