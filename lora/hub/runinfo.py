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

from lora.datapaths import DatasetPaths
from lora.runpaths import DIFFUSERS_WEIGHTS, RunPaths


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
    data = RunPaths(run_dir).read_config() or {}
    nested = data.get("config")
    if isinstance(nested, dict):  # {"config": {...}, "dataset_version": ...}
        data = {**nested, **{k: v for k, v in data.items() if k != "config"}}
    return data


def _scalar(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)


#: What the card says about the data when the data set's origin is not recorded.
UNKNOWN_SOURCE = "a folder of images with kohya-style caption files"


@dataclass
class RunInfo:
    """The card's inputs: names, settings, data set, metrics, samples and LoRA files.

    ``trained_on`` is the model the run was really trained on (from its config); ``base_model``
    is what the card names as the base (``--base-model`` when given, else ``trained_on``).
    """

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
    trained_on: str | None = None
    data_source: str = UNKNOWN_SOURCE

    @property
    def kohya_file(self) -> Path | None:
        """The AUTOMATIC1111/ComfyUI file: any LoRA file other than the diffusers one."""
        others = [p for p in self.lora_files if p.name != DIFFUSERS_WEIGHTS]
        preferred = [p for p in others if p.stem == self.run_name]
        return (preferred or others or [None])[0]

    @property
    def has_diffusers_file(self) -> bool:
        return any(p.name == DIFFUSERS_WEIGHTS for p in self.lora_files)


def _version_record(run_dir: Path, dataset: str | None, version: str | None) -> dict[str, Any] | None:
    """``versions/<version>.json`` of the run's data set, when it can be found."""
    if not (dataset and version):
        return None
    candidates = [DatasetPaths(dataset).version_file(version)]
    workspace = RunPaths(run_dir).workspace  # runs/<name>/ sits next to datasets/<name>/
    if workspace is not None:
        candidates.append(DatasetPaths(DatasetPaths.datasets_root(workspace) / Path(dataset).name).version_file(version))
    for path in candidates:
        try:
            data = read_json(path) if path.is_file() else None
        except OSError:
            data = None
        if data:
            return data
    return None


def _dataset_size(cfg: dict[str, Any], log: dict[str, Any], record: dict[str, Any] | None) -> int | None:
    for source in (log, cfg):
        for key in ("dataset_size", "num_images", "train_images"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    if record and isinstance(record.get("count"), int):
        return int(record["count"])
    return None


def describe_source(record: dict[str, Any] | None) -> str:
    """Where the images came from, as the data-set version records it.

    ``animelora fetch`` records each query's Danbooru tags; ``animelora import`` records its
    queries as ``local:<folder>`` (the folder path itself stays out of the card).
    """
    queries = record.get("queries") if record else None
    if not isinstance(queries, dict) or not queries:
        return UNKNOWN_SOURCE
    tags = [str(v) for v in queries.values() if isinstance(v, str) and not v.startswith("local:")]
    imported = any(isinstance(v, str) and v.startswith("local:") for v in queries.values())
    danbooru = ("Danbooru posts selected by tag query (" + "; ".join(f"`{t}`" for t in sorted(tags))
                + "), near-duplicates removed, captioned with kohya-style tags") if tags else ""
    local = ("images imported from a local folder (their original source is not recorded by "
             "animelora), near-duplicates removed, with kohya-style captions") if imported else ""
    if danbooru and local:
        return f"{danbooru}; and {local}"
    return danbooru or local


def kohya_trigger_phrase(lora_files: list[Path]) -> str | None:
    """``modelspec.trigger_phrase`` from the run's kohya file header, if it has one."""
    for path in lora_files:
        if path.name == DIFFUSERS_WEIGHTS:
            continue
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size <= 100_000_000:
                    continue
                header = json.loads(fh.read(size))
        except (OSError, ValueError):
            continue
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        phrase = meta.get("modelspec.trigger_phrase") if isinstance(meta, dict) else None
        if isinstance(phrase, str) and phrase.strip():
            return phrase.strip()
    return None


def gather(run_dir: Path, trigger_word: str | None = None, base_model: str | None = None) -> RunInfo:
    """Collect a run's card inputs; absent pieces are None, never an error.

    ``trigger_word`` defaults to the one the kohya file records; ``base_model`` to the model
    the run was trained on.
    """
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    cfg = _config(run_dir)
    log = paths.read_log() or {}
    run_name = str(log.get("run_name") or cfg.get("run_name") or run_dir.name)
    trained_on = cfg.get("model") or cfg.get("base_model") or log.get("base_model")
    trained_on = str(trained_on) if trained_on else None
    settings = {}
    for key in CARD_SETTINGS:
        value = cfg.get(key, log.get(key))  # the resolved config is the source of truth
        if value is not None and _scalar(value):
            settings[key] = value
    dataset = cfg.get("dataset") if isinstance(cfg.get("dataset"), str) else None
    version = log.get("dataset_version") or cfg.get("dataset_version")
    version = str(version) if version else None
    # The two files the trainer exports under this run's name, never every *.safetensors in
    # lora/: a user's other LoRA dropped there must not reach a public repo.
    lora_files = [p for p in (paths.diffusers_weights, paths.kohya_weights(run_name))
                  if p.is_file() and not p.is_symlink()]
    trigger = (trigger_word or cfg.get("trigger_word") or log.get("trigger_word")
               or kohya_trigger_phrase(lora_files))
    record = _version_record(run_dir, dataset, version)
    return RunInfo(
        run_dir=run_dir,
        run_name=run_name,
        base_model=base_model or trained_on,
        settings=settings,
        dataset=Path(dataset).name if dataset else None,
        dataset_version=version,
        dataset_size=_dataset_size(cfg, log, record),
        trigger_word=str(trigger) if trigger else None,
        metrics=read_json(paths.metrics),
        samples=read_json(paths.samples_json),
        lora_files=lora_files,
        trained_on=trained_on,
        data_source=describe_source(record),
    )
