"""The run folder's layout (``<workspace>/runs/<run_name>/``): every name in it, and its status.

Why one owner: the trainer writes the folder, and sampling, analysis, the Hub staging, the
Prefect tasks and flows read it. When each of them spelled ``"training_log.json"`` or
``run_dir / "lora"`` itself, a layout change touched ten files in four layers. Here is the
only place that knows the names (docs/architecture.md, "Run folder"); a test keeps the
literals from coming back elsewhere. Like ``DatasetPaths`` for data sets, this module only
names paths and reads small JSON files: it imports neither torch nor Prefect.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``<workspace>/runs/``: where run folders live in a workspace.
RUNS_DIR = "runs"
CONFIG_FILE = "config.json"
LOG_FILE = "training_log.json"
#: The OS lock a trainer holds while it works in the folder (lora/train/run/runfolder.py).
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
LORA_DIR = "lora"
#: The diffusers/PEFT file (``load_lora_weights``); the kohya file is ``<run_name>.safetensors``.
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_SUFFIX = ".safetensors"
#: ``lora-step-<n>/``: a finished run's LoRA files, kept when ``--extend`` trains it further.
KEPT_LORA_PREFIX = f"{LORA_DIR}-step-"
SAMPLES_DIR = "samples"
SAMPLES_JSON = "samples.json"
SAMPLES_GRID = "grid.png"
#: ``training_samples/``: sets drawn while the run trains, ``step-<n>/`` each (images and
#: ``samples.json``), and ``overview/grid.png``: every set side by side, one column per step.
#: Not under ``samples/``, which ``animelora sample`` rebuilds whole.
TRAINING_SAMPLES_DIR = "training_samples"
TRAINING_SAMPLES_STEP_PREFIX = "step-"
TRAINING_SAMPLES_OVERVIEW = "overview"
#: ``tensorboard/``: TensorBoard event files (``tensorboard --logdir <workspace>/runs``).
TENSORBOARD_DIR = "tensorboard"
REPORT_DIR = "report"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
LOSS_PLOT = "loss_curve.png"
COMPARISON_PLOT = "comparison.png"
LADDER_PLOT = "ladder.png"
#: ``report/training_samples.png``: the overview of the samples drawn while training.
REPORT_TRAINING_SAMPLES = "training_samples.png"
#: What ``publish`` uploads; it keeps the run folder's ``samples/`` and ``report/`` names.
HUB_DIR = "hub"
#: The model card in ``hub/`` (the repo's README).
HUB_CARD = "README.md"


def _read_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class RunPaths:
    """Where everything of one run lives, and what its files say about it.

    ``root`` is taken as given (not resolved), so paths shown to the user keep their form.
    """

    root: Path

    def __init__(self, root: Path | str) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, workspace: Path | str, run_name: str) -> "RunPaths":
        """``<workspace>/runs/<run_name>`` (the workspace resolved)."""
        return cls(cls.runs_root(workspace) / run_name)

    @staticmethod
    def runs_root(workspace: Path | str) -> Path:
        return Path(workspace).expanduser().resolve() / RUNS_DIR

    # -- names -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def workspace(self) -> Path | None:
        """The workspace this run belongs to: the folder above ``runs/``; None outside one."""
        return self.root.parent.parent if self.root.parent.name == RUNS_DIR else None

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def lora(self) -> Path:
        return self.root / LORA_DIR

    @property
    def diffusers_weights(self) -> Path:
        return self.lora / DIFFUSERS_WEIGHTS

    def kohya_weights(self, run_name: str | None = None) -> Path:
        """``lora/<run_name>.safetensors`` (the run name defaults to the folder's name)."""
        return self.lora / f"{run_name or self.name}{LORA_SUFFIX}"

    def kept_lora(self, step: int) -> Path:
        """``lora-step-<step>/``: the LoRA files of a run finished at ``step``, then extended."""
        return self.root / f"{KEPT_LORA_PREFIX}{step}"

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_DIR

    @property
    def samples_json(self) -> Path:
        return self.samples / SAMPLES_JSON

    @property
    def samples_grid(self) -> Path:
        return self.samples / SAMPLES_GRID

    @property
    def training_samples(self) -> Path:
        return self.root / TRAINING_SAMPLES_DIR

    def training_sample_set(self, step: int) -> Path:
        """``training_samples/step-<step>/``: the set drawn after global step ``step``."""
        return self.training_samples / f"{TRAINING_SAMPLES_STEP_PREFIX}{step}"

    def training_sample_steps(self) -> list[int]:
        """The steps whose sets are on disk (``step-<n>/`` holding its ``samples.json``), sorted.

        Read from the folders, not the training log: the log on disk is written at checkpoints,
        after the sets it lists, so a display updated after each set would lag behind."""
        steps = []
        for folder in self.training_samples.glob(f"{TRAINING_SAMPLES_STEP_PREFIX}*"):
            number = folder.name.removeprefix(TRAINING_SAMPLES_STEP_PREFIX)
            if number.isdigit() and (folder / SAMPLES_JSON).is_file():
                steps.append(int(number))
        return sorted(steps)

    @property
    def training_samples_overview(self) -> Path:
        return self.training_samples / TRAINING_SAMPLES_OVERVIEW

    @property
    def training_samples_grid(self) -> Path:
        """The growing grid: every set drawn so far, one column per step."""
        return self.training_samples_overview / SAMPLES_GRID

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def metrics(self) -> Path:
        return self.report / METRICS_FILE

    @property
    def report_md(self) -> Path:
        return self.report / REPORT_FILE

    @property
    def loss_plot(self) -> Path:
        return self.report / LOSS_PLOT

    @property
    def comparison_plot(self) -> Path:
        return self.report / COMPARISON_PLOT

    @property
    def ladder_plot(self) -> Path:
        return self.report / LADDER_PLOT

    @property
    def report_training_samples(self) -> Path:
        return self.report / REPORT_TRAINING_SAMPLES

    @property
    def hub(self) -> Path:
        return self.root / HUB_DIR

    @property
    def hub_card(self) -> Path:
        return self.hub / HUB_CARD

    # -- status ------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any] | None:
        """``config.json`` as written (None when absent or unreadable)."""
        return _read_object(self.config)

    def read_log(self) -> dict[str, Any] | None:
        """``training_log.json`` (None when absent or unreadable: no step logged yet)."""
        return _read_object(self.log)

    def lora_files(self) -> list[Path]:
        """Every ``*.safetensors`` file in ``lora/``, sorted by name (both formats)."""
        if not self.lora.is_dir():
            return []
        return sorted(p for p in self.lora.glob(f"*{LORA_SUFFIX}") if p.is_file())

    def exported_lora_files(self, run_name: str | None = None) -> list[Path]:
        """The two files a finished run exports (diffusers, kohya), or [] unless both exist."""
        files = [self.diffusers_weights, self.kohya_weights(run_name)]
        return files if all(p.is_file() for p in files) else []

    def global_step(self) -> int:
        """The steps the training log records (0 before the first logged step)."""
        step = (self.read_log() or {}).get("global_step", 0)
        return step if isinstance(step, int) and not isinstance(step, bool) else 0

    def finished_step(self) -> int | None:
        """The step the log says the run finished at; None while it is not finished."""
        logged = self.read_log() or {}
        step = logged.get("global_step") if logged.get("complete") else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def is_complete(self) -> bool:
        """Finished: the log says so and the LoRA files are there (nothing left to train)."""
        logged = self.read_log() or {}
        return bool(logged.get("complete")) and bool(self.lora_files())


__all__ = [
    "CHECKPOINTS_DIR", "COMPARISON_PLOT", "CONFIG_FILE", "DIFFUSERS_WEIGHTS", "HUB_CARD", "HUB_DIR", "KEPT_LORA_PREFIX",
    "LADDER_PLOT", "LOCK_FILE", "LOG_FILE", "LORA_DIR", "LORA_SUFFIX", "LOSS_PLOT", "METRICS_FILE",
    "REPORT_DIR", "REPORT_FILE", "REPORT_TRAINING_SAMPLES", "RUNS_DIR", "RunPaths", "SAMPLES_DIR", "SAMPLES_GRID",
    "SAMPLES_JSON", "TENSORBOARD_DIR", "TRAINING_SAMPLES_DIR", "TRAINING_SAMPLES_OVERVIEW",
    "TRAINING_SAMPLES_STEP_PREFIX",
]
