"""What the model card needs from a run folder, read defensively.

A run folder holds ``config.json`` (the resolved training config), ``training_log.json``,
``report/metrics.json``, ``samples/samples.json`` and the LoRA files. Only named, harmless
settings are taken from the config (an allow-list), so nothing unexpected in it, such as a
credential someone put there, can reach the card.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"

#: Settings shown in the card, in this order, when the run recorded them.
CARD_SETTINGS = (
    "preset", "epochs", "batch_size", "gradient_accumulation", "learning_rate",
    "text_encoder_lr", "lr_scheduler", "warmup_steps", "optimizer", "max_grad_norm",
    "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "train_text_encoder",
    "resolution", "mixed_precision", "min_snr_gamma", "noise_offset", "seed", "max_steps",
    "total_steps", "global_step",
)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _config(run_dir: Path) -> dict[str, Any]:
    data = read_json(run_dir / "config.json") or {}
    nested = data.get("config")
    if isinstance(nested, dict):  # {"config": {...}, "dataset_version": ...}
        data = {**nested, **{k: v for k, v in data.items() if k != "config"}}
    return data


def _scalar(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)


@dataclass
class RunInfo:
    """The card's inputs: names, settings, data set, metrics, samples and LoRA files."""

    run_dir: Path
    run_name: str
    base_model: str | None
    settings: dict[str, Any]
    dataset: str | None
    dataset_version: str | None
    dataset_size: int | None
    trigger_word: str | None
    metrics: dict[str, Any] | None
    samples: dict[str, Any] | None
    lora_files: list[Path] = field(default_factory=list)

    @property
    def kohya_file(self) -> Path | None:
        """The AUTOMATIC1111/ComfyUI file: any LoRA file other than the diffusers one."""
        others = [p for p in self.lora_files if p.name != DIFFUSERS_WEIGHTS]
        preferred = [p for p in others if p.stem == self.run_name]
        return (preferred or others or [None])[0]

    @property
    def has_diffusers_file(self) -> bool:
        return any(p.name == DIFFUSERS_WEIGHTS for p in self.lora_files)


def _dataset_size(run_dir: Path, cfg: dict[str, Any], log: dict[str, Any],
                  dataset: str | None, version: str | None) -> int | None:
    for source in (log, cfg):
        for key in ("dataset_size", "num_images", "train_images"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    if not (dataset and version):
        return None
    # runs/<name>/ sits next to datasets/<name>/ in the workspace.
    candidates = [Path(dataset) / "versions" / f"{version}.json",
                  run_dir.parent.parent / "datasets" / dataset / "versions" / f"{version}.json"]
    for path in candidates:
        try:
            data = read_json(path) if path.is_file() else None
        except OSError:
            data = None
        if data and isinstance(data.get("count"), int):
            return int(data["count"])
    return None


def gather(run_dir: Path, trigger_word: str | None = None) -> RunInfo:
    """Collect a run's card inputs; absent pieces are None, never an error."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    log = read_json(run_dir / "training_log.json") or {}
    run_name = str(log.get("run_name") or cfg.get("run_name") or run_dir.name)
    base_model = cfg.get("model") or cfg.get("base_model") or log.get("base_model")
    settings = {}
    for key in CARD_SETTINGS:
        value = cfg.get(key, log.get(key))  # the resolved config is the source of truth
        if value is not None and _scalar(value):
            settings[key] = value
    dataset = cfg.get("dataset") if isinstance(cfg.get("dataset"), str) else None
    version = log.get("dataset_version") or cfg.get("dataset_version")
    version = str(version) if version else None
    trigger = trigger_word or cfg.get("trigger_word") or log.get("trigger_word")
    lora_dir = run_dir / "lora"
    lora_files = sorted(p for p in lora_dir.glob("*.safetensors")
                        if p.is_file() and not p.is_symlink()) if lora_dir.is_dir() else []
    return RunInfo(
        run_dir=run_dir,
        run_name=run_name,
        base_model=str(base_model) if base_model else None,
        settings=settings,
        dataset=Path(dataset).name if dataset else None,
        dataset_version=version,
        dataset_size=_dataset_size(run_dir, cfg, log, dataset, version),
        trigger_word=str(trigger) if trigger else None,
        metrics=read_json(run_dir / "report" / "metrics.json"),
        samples=read_json(run_dir / "samples" / "samples.json"),
        lora_files=lora_files,
    )
