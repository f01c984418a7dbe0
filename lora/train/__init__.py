"""The training engine: data plan, caches, seeded loop, checkpoints, validation and logs.

Public API (used by ``animelora.commands.train`` and the Prefect tasks, one call per segment)::

    train(cfg, run_dir, *, stop_at_step=None, time_budget_s=None, on_progress=None, extend=False) -> TrainResult
    plan_total_steps(cfg, dataset_dir=None) -> int

Sub-packages, each with one job; imports only go down this list (tests/train/test_train_imports.py):

- ``run/``: resume or start a segment (start.py), its loop (loop.py), when to stop and what is
  due between steps (schedule.py), the run folder's rules, the log, signals;
- ``setup/``: accelerator, base model and caches, UNet and text-encoder LoRA, optimizer and
  schedule, built into one ``TrainingSetup``;
- ``export.py`` (the LoRA files and their metadata), ``validation.py`` (held-out scoring);
- ``checkpoint/``: the checkpoint's files and typed state (nothing else reads them);
- ``step/``: one optimizer step: pipeline, runner (the only owner of the learning rate), inputs,
  the one loss function, the plain and the CUDA-graphed executor behind one interface;
- ``speed/``: the speed options decided for a device, compile, fused q/k/v, half norms;
- ``data/``: data set, split, buckets, batch order, plan, latent cache;
- ``errors.py``, ``seeds.py``, ``distributed.py``: used by all of them.
"""
from .data.dataset import DatasetError
from .data.plan import DataPlan, make_plan, plan_total_steps
from .errors import NonFiniteLossError, TrainingError
from .run.loop import TrainResult
from .run.runfolder import RunFolderError, lora_files
from .run.start import train
from .step.runner import FAKE_OOM_ENV

__all__ = [
    "DataPlan", "DatasetError", "FAKE_OOM_ENV", "NonFiniteLossError", "RunFolderError", "TrainResult",
    "TrainingError",
    "lora_files", "make_plan", "plan_total_steps", "train",
]
