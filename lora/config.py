"""Training presets and the validated training configuration.

Why one pydantic model: the CLI, a config file, the Prefect flow and a resumed run must all
agree on exactly one set of knobs, and a typo or an impossible value must fail before any
model is loaded, with one line naming the field ("invalid training config: learning_rate:
must be > 0").

Resolution order (later wins): ``TrainConfig`` defaults < preset < config file < overrides.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

import pydantic
from pydantic import Field, field_validator, model_validator

from lora.model.tiny import TINY_RESOLUTION

#: The blog guide's Phase 1.5 / Phase 2A settings (README: Presets). Anything not named keeps its default.
PRESETS: dict[str, dict[str, Any]] = {
    "phase1.5": {
        "epochs": 10, "batch_size": 2, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32,
        "lr_scheduler": "constant",
    },
    "phase2a": {
        "epochs": 20, "batch_size": 4, "learning_rate": 5e-5, "lora_rank": 16, "lora_alpha": 64,
        "lr_scheduler": "constant",
    },
    "phase2a-l2": {
        "epochs": 20, "batch_size": 4, "learning_rate": 5e-5, "lora_rank": 16, "lora_alpha": 64,
        "lr_scheduler": "constant", "target_dataset_size": 600,
    },
    "phase2b": {
        "epochs": 20, "batch_size": 4, "learning_rate": 5e-5, "lora_rank": 16, "lora_alpha": 64,
        "lr_scheduler": "cosine", "warmup_steps": 500, "gradient_accumulation": 2,
        "max_grad_norm": 1.0,
    },
}

DEFAULT_PRESET = "phase2a"
#: Upper bounds of the numeric settings: far beyond any real run, so they only stop values that
#: would fail later (a rank of 1e9 allocates the LoRA factors, an infinite learning rate trains
#: NaNs) or a typo of several orders of magnitude. SD1.5's widest projection has 1280 features:
#: a LoRA rank above 1024 is no longer low-rank.
MAX_LORA_RANK = 1024
MAX_LEARNING_RATE = 1.0
MAX_BATCH = 1024
MAX_STEPS = 10**8
MAX_IMAGES = 10**7
MAX_MINUTES = 10**6
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Fields that may change between segments of one run without changing what is trained: the
#: speed options, where the run keeps its files and checkpoints, the length of the run and the
#: output's tensor type. Everything else is the run's recipe (:func:`recipe`).
RESUME_TOLERANT_FIELDS = frozenset({
    "max_steps", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints",
    "cache_dir", "save_dtype", "speed", "samples",
})


class ConfigError(ValueError):
    """A bad training configuration; the message is one line naming the field."""


Switch = Literal["auto", "on", "off"]


class SpeedOptions(pydantic.BaseModel, extra="forbid", allow_inf_nan=False):
    """How fast a run trains and in how much memory; nothing here changes what is trained.

    Why apart from the recipe (:class:`TrainConfig`): a run may change these between segments
    (a resumed run on another card, a fast path that failed there), the checkpoints record the
    recipe without them, and a speed change never counts as "a different run". The switches'
    meaning and their measured effect: lora/train/speed/ and bench/README.md.
    """

    # fit a consumer card (8 GB) at batch 4: gradient checkpointing on, compile off unless set
    # "on", expandable allocator segments (2.84 GiB held on an H200: bench/README.md)
    low_memory: bool = False
    # recompute activations in the backward pass instead of keeping them (same gradients)
    gradient_checkpointing: bool = False
    # CUDA fast path (lora/train/speed/); "auto" = on for a CUDA device, off on CPU
    compile: Switch = "auto"
    # what compile compiles: "unet" (and "auto") = the whole UNet, once per bucket shape;
    # "blocks" = each repeated resnet/transformer block with dynamic height/width, one compile
    # for every shape: experimental, PyTorch 2.11's inductor fails on it and the trainer then
    # continues without compile (bench/README.md, "many buckets")
    compile_scope: Literal["auto", "unet", "blocks"] = "auto"
    cuda_graphs: Switch = "auto"
    channels_last: Switch = "auto"
    # scaled-dot-product attention kernel: "auto" = the fast path's measured choice on CUDA
    # (bench/README.md), PyTorch's own choice elsewhere; "default" = always PyTorch's choice
    attention: Literal["auto", "default", "cudnn", "flash", "efficient", "math"] = "auto"
    # cuDNN tries its convolution algorithms once per shape and keeps the fastest
    cudnn_benchmark: Switch = "auto"
    # q/k/v (and cross-attention k/v) projections of each attention layer, LoRA included, as one
    # matrix product each instead of three (lora/train/speed/fused_qkv.py); weights are stored as before
    fused_qkv: Switch = "auto"
    # queue step n+1 before reading step n's loss, so the GPU never waits for the host's
    # bookkeeping; losses, progress and a NaN check arrive one step later (nothing is saved
    # in between)
    overlap_steps: Switch = "auto"
    # inside the compiled UNet keep activations channels-last from convolution to convolution
    # (inductor's layout optimisation, which its own heuristics skip for UNets because of their
    # skip-connection convolutions), so no layout copies run around each convolution
    compiled_channels_last: Switch = "auto"
    # the UNet's group/layer norms read and write bf16/fp16 activations under autocast
    # (statistics still in fp32) instead of autocast's fp32 outputs, so the eager step does not
    # cast every activation to fp32 and back (lora/train/speed/half_norms.py)
    half_norms: Switch = "auto"


#: Images per set of samples while training (:class:`SampleOptions`): the default prompts
#: (lora/sample.py, the trigger word first) at one seed.
MAX_SAMPLE_IMAGES = 64


class SampleOptions(pydantic.BaseModel, extra="forbid", allow_inf_nan=False):
    """Sample images while a run trains (lora/train/samples.py); nothing here changes what is trained.

    Why apart from the recipe (:class:`TrainConfig`): like the speed options, a run may change
    them between segments (``--set samples=off`` on a resumed run) and checkpoints never record
    them. Each set is drawn at fixed global steps with fixed prompts and seeds, so a resumed run
    draws the same sets as an uninterrupted one. ``--set samples=off`` turns them off.

    When (the last step always gets a set): by default ``sets`` sets spread evenly over the
    run's epochs, at epoch ends, plus one at step 0 (``at_start``: the base model, the LoRA
    still at zero). ``every_epochs`` or ``every_steps`` (kohya's ``--sample_every_n_epochs`` /
    ``_steps``) replace the even spread. The default draws 5 sets (step 0 and 4 more; phase2a's
    20 epochs: after epochs 5, 10, 15 and 20) of 5 images (the default prompts at one seed),
    each 20 DPM++ steps with classifier-free guidance, 25 images a run (the tiny model: one
    prompt, 4 steps).
    What that costs on a GPU is measured by bench/e2e.py's ``nosamples`` variant beside
    ``default`` (README, "Samples while training"), not assumed here.
    """

    enabled: bool = True
    sets: int = Field(default=4, ge=1, le=MAX_STEPS)
    every_epochs: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    every_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    at_start: bool = True
    # what: a prompt file like kohya's --sample_prompts (one prompt per line, # comments, or a
    # JSON list), else ``prompts``, else lora/sample.py's default prompts with the trigger word first
    prompts_file: str | None = None
    prompts: list[str] | None = Field(default=None, min_length=1, max_length=MAX_SAMPLE_IMAGES)
    negative_prompt: str | None = None  # None: lora/sample.py's default negative prompt
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SAMPLE_IMAGES)
    # denoising steps (DPM++ 2M Karras); None: 20, 4 for the tiny model
    steps: int | None = Field(default=None, gt=0, le=1000)
    guidance: float = Field(default=7.0, ge=0, le=100)
    resolution: int | None = Field(default=None, ge=32, le=4096)  # None: the training resolution

    @model_validator(mode="before")
    @classmethod
    def _on_off(cls, data: Any) -> Any:
        """``samples=off`` / ``false`` / ``on`` / ``true`` (``--set samples=off``)."""
        if isinstance(data, bool):
            return {"enabled": data}
        if isinstance(data, str) and data.strip().lower() in ("off", "on", "false", "true", "no", "yes"):
            return {"enabled": data.strip().lower() in ("on", "true", "yes")}
        return data

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @field_validator("prompts")
    @classmethod
    def _no_empty_prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not p.strip() for p in v):
            raise ValueError("prompts must not be empty")
        return v


#: The speed options' names: also accepted flat (``compile=off``), as every config before them
#: wrote them, and as ``speed.compile=off``.
SPEED_FIELDS = frozenset(SpeedOptions.model_fields)


def nest_speed_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with flat speed settings (``compile``, ``speed.compile``) moved into ``speed``.

    Why: config.json files of existing runs, presets, config files and ``--set name=value``
    name them flat; they load unchanged. A flat name wins over the same name inside ``speed``
    (it is the later, more specific setting: ``--set`` over a config file)."""
    out = dict(values)
    speed = out.get("speed")
    if isinstance(speed, SpeedOptions):
        speed = speed.model_dump()
    if speed is not None and not isinstance(speed, Mapping):
        return out  # not an object: pydantic names the field
    moved = {key.removeprefix("speed."): out.pop(key) for key in list(out)
             if key in SPEED_FIELDS or key.startswith("speed.")}
    if speed is not None or moved:
        out["speed"] = {**(speed or {}), **moved}
    return out


def nest_sample_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``samples.<field>`` keys moved into ``samples`` (over what it held;
    ``samples=off`` and ``samples=on`` become ``enabled``)."""
    out = dict(values)
    moved = {key.removeprefix("samples."): out.pop(key) for key in list(out) if key.startswith("samples.")}
    if not moved:
        return out
    current = out.get("samples")
    if isinstance(current, SampleOptions):
        current = current.model_dump()
    elif current is not None and not isinstance(current, Mapping):
        current = SampleOptions._on_off(current)
    if current is not None and not isinstance(current, Mapping):
        return {**out, **{f"samples.{k}": v for k, v in moved.items()}}  # pydantic names them
    out["samples"] = {**(current or {}), **moved}
    return out


def check_preset(name: str) -> str:
    """``name`` when it is a preset; else a ValueError listing the valid ones (the config, the
    flows' parameters and :func:`resolve_config` all say it in these words)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return name


def setting_names() -> frozenset[str]:
    """Every name ``--set`` and a sweep's grid accept: the fields of :class:`TrainConfig`, the
    speed options flat (as configs before them wrote them) and ``speed.<field>`` /
    ``samples.<field>`` for the nested option objects."""
    dotted = {f"speed.{f}" for f in SpeedOptions.model_fields} | {f"samples.{f}" for f in SampleOptions.model_fields}
    return frozenset(TrainConfig.model_fields) | SPEED_FIELDS | dotted


class TrainConfig(pydantic.BaseModel, extra="forbid", allow_inf_nan=False):
    """Every knob of a training run. Field docs are what ``--set key=value`` accepts.

    Numbers are finite and within bounds (:data:`MAX_LORA_RANK` and its neighbours): a value that no run
    could use (``learning_rate=inf``, ``lora_rank=1e9``) is refused here, naming the field,
    instead of failing after the model and the caches were loaded.
    """

    # what and where
    preset: str = DEFAULT_PRESET
    run_name: str | None = None
    model: str = DEFAULT_MODEL
    dataset: str | None = None
    dataset_version: str | None = None
    cache_dir: str | None = None  # default: lora.train.data.cache.train_cache_root (never the data set)
    target_dataset_size: int | None = Field(default=None, gt=0, le=MAX_IMAGES)

    # schedule
    epochs: int = Field(default=20, gt=0, le=MAX_STEPS)
    max_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    batch_size: int = Field(default=4, gt=0, le=MAX_BATCH)
    gradient_accumulation: int = Field(default=1, ge=1, le=MAX_BATCH)
    learning_rate: float = Field(default=5e-5, gt=0, le=MAX_LEARNING_RATE)
    text_encoder_lr: float | None = Field(default=None, gt=0, le=MAX_LEARNING_RATE)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = Field(default=1e-2, ge=0, le=1)
    max_grad_norm: float | None = Field(default=None, gt=0)

    # LoRA
    lora_rank: int = Field(default=16, gt=0, le=MAX_LORA_RANK)
    lora_alpha: float = Field(default=64, gt=0, le=4 * MAX_LORA_RANK)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False

    # loss and noise
    min_snr_gamma: float | None = Field(default=None, gt=0, le=1000)
    noise_offset: float = Field(default=0.0, ge=0, le=1)

    # data
    resolution: int = Field(default=512, ge=32, le=4096)
    flip: bool = False
    caption_shuffle: bool = False
    keep_tokens: int = Field(default=1, ge=0, le=1000)

    # precision of the frozen weights and the forward (LoRA weights always train in fp32)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    # how fast and in how much memory: lora.config.SpeedOptions (``--set compile=off`` and
    # ``--set speed.compile=off`` both set it); none of it changes what is trained
    speed: SpeedOptions = Field(default_factory=lambda: SpeedOptions())
    # sample images while training (lora.config.SampleOptions; ``--set samples=off``): not part
    # of the recipe either
    samples: SampleOptions = Field(default_factory=lambda: SampleOptions())
    seed: int = Field(default=42, ge=0, le=2**63 - 1)

    # validation: the held-out images belong to the data set (lora/data/split.py);
    # validation_fraction is the held-out share of a data set whose split file a run creates,
    # validation_count / validation_max cap how many of the held-out images a run scores
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    validation_count: int | None = Field(default=None, ge=0, le=MAX_IMAGES)
    validation_max: int = Field(default=50, ge=0, le=MAX_IMAGES)
    validation_timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900])
    validate_every_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)  # None: at each epoch end

    # checkpoints
    checkpoint_every_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    checkpoint_every_minutes: float | None = Field(default=10.0, gt=0, le=MAX_MINUTES)
    keep_checkpoints: int = Field(default=3, ge=1, le=1000)

    # output: tensor type of the kohya/A1111/ComfyUI file (fp16 = the usual shared size, half
    # of fp32; training itself is unchanged, so a run may switch it between segments)
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"

    @model_validator(mode="before")
    @classmethod
    def _flat_speed_settings(cls, data: Any) -> Any:
        """Flat speed settings (every config before :class:`SpeedOptions`) load unchanged, and
        ``samples.<field>`` (``--set samples.steps=4``) goes into ``samples``."""
        return nest_sample_options(nest_speed_options(data)) if isinstance(data, Mapping) else data

    @model_validator(mode="before")
    @classmethod
    def _tiny_default_resolution(cls, data: Any) -> Any:
        """The tiny model trains at its own small size unless a resolution was asked for."""
        if isinstance(data, Mapping) and data.get("model") == "tiny" and "resolution" not in data:
            data = {**data, "resolution": TINY_RESOLUTION}
        return data

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16")
        return v

    @field_validator("validation_timesteps")
    @classmethod
    def _timesteps_in_range(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t < 1000]
        if bad:
            raise ValueError(f"timesteps must be in [0, 999], got {bad}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: list[str]) -> list[str]:
        if not v or any(not m.strip() for m in v):
            raise ValueError("must name at least one module, without empty names")
        return v

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        return check_preset(v)


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown setting",
    "finite_number": "must be a finite number",
}


def format_validation_error(exc: pydantic.ValidationError) -> str:
    """One line: ``invalid training config: field: problem[; field: problem]``."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "config"
        template = _MESSAGES.get(err.get("type", ""))
        ctx = {k: (int(v) if isinstance(v, float) and v.is_integer() else v)
               for k, v in (err.get("ctx") or {}).items()}
        if template:
            try:
                msg = template.format(**ctx)
            except (KeyError, IndexError):
                msg = err.get("msg", "invalid")
        else:
            msg = str(err.get("msg", "invalid"))
            for prefix in ("Value error, ", "Assertion failed, "):
                msg = msg.removeprefix(prefix)
        parts.append(f"{field}: {msg}")
    return "invalid training config: " + "; ".join(parts)


def make_config(values: Mapping[str, Any]) -> TrainConfig:
    """``TrainConfig(**values)`` with pydantic's error turned into one :class:`ConfigError` line."""
    try:
        return TrainConfig(**dict(values))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or TOML file of ``TrainConfig`` fields (a top-level ``[train]`` table is accepted)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"invalid training config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"invalid training config: {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict) and len(data) == 1:
        data = data["train"]
    if not isinstance(data, dict):
        raise ConfigError(f"invalid training config: {path} must hold an object of settings")
    return data


def resolve_config(
    preset: str | None, overrides: Mapping[str, Any] | None = None, config_file: Path | None = None
) -> TrainConfig:
    """Defaults < preset < config file < overrides, validated.

    ``preset`` None means the config file's ``preset`` or the default (phase2a). An override
    whose value is None is ignored (so unset CLI flags can be passed through as they are).
    """
    file_values = read_config_file(config_file) if config_file else {}
    override_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = override_values.pop("preset", None) or preset or file_values.get("preset") or DEFAULT_PRESET
    try:
        check_preset(name)
    except ValueError as exc:
        raise ConfigError(f"invalid training config: preset: {exc}") from None
    values: dict[str, Any] = {**PRESETS[name], **file_values, **override_values, "preset": name}
    return make_config(values)


#: Settings that only label a run (where its values came from, its name in files and cards):
#: not part of what its weights are trained with.
LABEL_FIELDS = frozenset({"preset", "run_name"})


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """What a run's weights are trained with (JSON): every setting except the speed options,
    the run's length, checkpoint cadence and file places (:data:`RESUME_TOLERANT_FIELDS`) and
    the labels. Every checkpoint records it, so a run never resumes under another one."""
    skip = RESUME_TOLERANT_FIELDS | LABEL_FIELDS
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Fields whose values differ, ignoring the ones a resumed segment may change (flat speed
    settings of an older config included)."""
    old, new = nest_speed_options(old), nest_speed_options(new)
    keys = (set(old) | set(new)) - RESUME_TOLERANT_FIELDS
    return sorted(k for k in keys if old.get(k) != new.get(k))
