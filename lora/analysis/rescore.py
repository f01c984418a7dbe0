"""Re-score runs' exported LoRAs on one common held-out set, for a fair paired comparison.

Why: a log can only be paired with another on the held-out images both were validated on.
Runs made before the data set owned the split (each seed held out its own images), runs on
different versions of a data set, and logs without per-image losses share too few. Their
exported LoRAs can still be compared: score each one (and the base model) on the images that
*no* compared run trained on, at the same timesteps with the same fixed noise as training-time
validation (lora/train/validation.py), then pair those scores (lora/analysis/paired.py).

Loads the base model once (tiny, a Hub id or a local path, as training does) and each run's
``lora/pytorch_lora_weights.safetensors`` in turn. Heavy imports happen inside the functions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lora.analysis.paired import Scores
from lora.runpaths import RunPaths



class RescoreError(ValueError):
    """Runs that cannot be re-scored together; the message names the run and what is missing."""


@dataclass(frozen=True)
class RunRecord:
    """What re-scoring needs from a run folder's ``config.json``."""

    name: str
    run_dir: Path
    model: str
    dataset_dir: Path
    dataset_version: str | None
    resolution: int
    timesteps: tuple[int, ...]
    held_out: frozenset[str]


@dataclass(frozen=True)
class Rescored:
    """Scores of every run and of the base model on the common images."""

    runs: tuple[Scores, ...]
    base: Scores
    images: tuple[str, ...]


def read_run(run_dir: Path | str) -> RunRecord:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    paths = RunPaths(run_dir)
    path = paths.config
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RescoreError(f"{run_dir}: no config.json (--rescore needs run folders)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RescoreError(f"{path}: unreadable ({exc})") from None
    cfg: dict[str, Any] = data.get("config") or {}
    if not paths.diffusers_weights.is_file():
        raise RescoreError(f"{run_dir}: no exported LoRA ({paths.diffusers_weights.relative_to(run_dir).as_posix()}); "
                           "finish the run first")
    dataset = data.get("dataset_dir") or cfg.get("dataset")
    if not dataset:
        raise RescoreError(f"{path}: names no data set (dataset_dir)")
    held = set(data.get("held_out_images") or []) | set(data.get("validation_images") or [])
    return RunRecord(
        name=cfg.get("run_name") or run_dir.name, run_dir=run_dir,
        model=data.get("base_model") or cfg.get("model") or "tiny",
        dataset_dir=Path(dataset), dataset_version=data.get("dataset_version") or cfg.get("dataset_version"),
        resolution=int(cfg.get("resolution") or 512),
        timesteps=tuple(int(t) for t in cfg.get("validation_timesteps") or (100, 300, 500, 700, 900)),
        held_out=frozenset(held),
    )


def common_images(runs: Sequence[RunRecord]):
    """The images of the data set's latest version that no run trained on (sorted by name)."""
    from lora.train.data.dataset import read_dataset

    folders = {r.dataset_dir.resolve() for r in runs}
    if len(folders) > 1:
        raise RescoreError("the runs were trained on different data sets "
                           f"({', '.join(sorted(str(f) for f in folders))}): no common held-out images")
    root = folders.pop()
    trained: set[str] = set()
    for run in runs:
        _, items = read_dataset(root, run.dataset_version)
        trained |= {i.name for i in items if i.name not in run.held_out}
    _, latest = read_dataset(root, None)
    return [i for i in latest if i.name not in trained]


def rescore_runs(run_dirs: Sequence[Path | str], *, device: str = "auto", max_images: int = 200) -> Rescored:
    """Score each run's exported LoRA and the base model on the common held-out images."""
    import torch
    from diffusers import DDPMScheduler

    from lora.model import load_pipeline
    from lora.train.data.buckets import assign_bucket, buckets_for
    from lora.train.data.cache import build_cache, encode_prompts
    from lora.train.validation import validation_loss

    runs = [read_run(d) for d in run_dirs]
    models = sorted({r.model for r in runs})
    if len(models) > 1:
        raise RescoreError(f"the runs use different base models ({', '.join(models)}): not comparable")
    items = common_images(runs)[:max_images]
    if not items:
        raise RescoreError("no image of the data set is held out from every run: nothing to score on")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    pipe = load_pipeline(models[0], device=dev)
    resolution, timesteps = runs[0].resolution, list(runs[0].timesteps)
    bucket_list = buckets_for(resolution)
    buckets = [assign_bucket(i.image, bucket_list) for i in items]
    cache = build_cache(items, buckets, root=runs[0].dataset_dir / "cache" / "train", model_id=models[0],
                        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        resolution=resolution, flip=False, device=dev)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    names = [i.name for i in items]

    def score(label: str, text) -> Scores:
        result = validation_loss(pipe.unet, scheduler, cache.latents, text, names, timesteps, dev)
        per_image = {n: {str(t): v for t, v in zip(result["timesteps"], losses)}
                     for n, losses in result["per_image"].items()}
        return Scores(label, per_image, None, models[0])

    base = score("base model", cache.text)
    scored = []
    for k, run in enumerate(runs):
        adapter = f"run{k}"
        weights = RunPaths(run.run_dir).diffusers_weights
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter)
        pipe.set_adapters([adapter])
        with torch.no_grad():  # the text encoder may carry the run's LoRA too
            text = [t for t in encode_prompts(pipe.tokenizer, pipe.text_encoder, [i.caption for i in items],
                                              dev).float().cpu()]
        scored.append(score(run.name, text))
        pipe.delete_adapters([adapter])
    return Rescored(tuple(scored), base, tuple(names))
