"""Loading SD1.5 components: the tiny model, a local diffusers folder, a single checkpoint file or a Hub id.

Why one module: the trainer (components) and the sampler (a pipeline) must resolve ``--model``
the same way, and every way of failing to reach the weights must end in one clear
``ModelLoadError`` line instead of a stack trace from deep inside huggingface_hub.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tiny import TINY_RESOLUTION, ensure_tiny_model

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Configs (and the tokenizer) that diffusers needs to turn an SD1.5 single file into a pipeline.
SINGLE_FILE_CONFIG_REPO = DEFAULT_MODEL


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded; the message is one line meant for the user."""


@dataclass
class Components:
    """Everything the trainer needs from a base model; all base parameters are frozen."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_id: str
    vae_scale_factor: int
    default_resolution: int


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", "\\"))
        or model.lower().endswith(SINGLE_FILE_SUFFIXES + (".pt", ".bin"))
        or model.count("/") > 1
        or (len(model) > 1 and model[1] == ":")  # Windows drive
    )


def resolve_model(model: str) -> str | Path:
    """Map ``--model`` to what loads it.

    ``"tiny"`` -> the built-in tiny model folder (built on first use); an existing diffusers
    folder (has model_index.json) or single ``.safetensors``/``.ckpt`` file -> that Path;
    a path-looking string that does not exist -> ``ModelLoadError``; anything else -> a Hub id.
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model: expected 'tiny', a Hub id or a path, got {model!r}")
    model = model.strip()
    if model == "tiny":
        return ensure_tiny_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
            raise ModelLoadError(
                f"cannot load base model '{model}': folder has no model_index.json or unet/config.json "
                "(expected a diffusers-format Stable Diffusion folder)"
            )
        return path
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"cannot load base model '{model}': single-file checkpoints must end in .safetensors or .ckpt"
            )
        return path
    if _looks_like_path(model):
        raise ModelLoadError(f"cannot load base model '{model}': no such file or folder")
    return model


def _unreachable_message(model: str) -> str:
    return (
        f"cannot load base model '{model}': not in the local Hugging Face cache and the Hub is unreachable; "
        f"download it first with `huggingface-cli download {model}` or pass --model PATH"
    )


def _is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause chain) says the Hub could not be reached or we are offline."""
    names = {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectTimeout",
        "ConnectError",
        "ReadTimeout",
        "TimeoutException",
        "NetworkError",
        "ProxyError",
        "gaierror",
    }
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(c.__name__ in names for c in type(cur).__mro__):
            return True
        text = str(cur).lower()
        if any(
            s in text
            for s in (
                "offline",
                "cannot reach",
                "couldn't connect",
                "could not connect",
                "connection error",
                "local_files_only",
                "local cache",
                "cannot find the requested files",
            )
        ):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "…") if len(text) > 300 else text or type(exc).__name__


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the Hub endpoint, so an unreachable Hub fails in seconds, not after
    huggingface_hub's ~30 s of retries. Skipped (assumed reachable) behind a proxy."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub_or_folder(source: str | Path, model: str, loader) -> Any:
    """Run ``loader(local_files_only)``: cache first, then the Hub; map failures to ModelLoadError."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return _load_hub_or_folder_inner(source, model, loader)


def _load_hub_or_folder_inner(source: str | Path, model: str, loader) -> Any:
    if isinstance(source, Path):
        try:
            return loader(local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - turn any loader failure into one clear line
            raise ModelLoadError(f"cannot load base model '{model}': {_one_line(exc)}") from exc
    try:
        return loader(local_files_only=True)
    except Exception as first:  # noqa: BLE001
        if _hub_offline() or not _hub_reachable():
            raise ModelLoadError(_unreachable_message(model)) from first
    try:
        return loader(local_files_only=False)
    except Exception as exc:  # noqa: BLE001
        if _is_network_error(exc):
            raise ModelLoadError(_unreachable_message(model)) from exc
        raise ModelLoadError(f"cannot load base model '{model}': {_one_line(exc)}") from exc


def _single_file_pipeline(path: Path, model: str, dtype: torch.dtype, config: str | Path | None):
    """``StableDiffusionPipeline.from_single_file`` with the SD1.5 config repo as the hint.

    diffusers needs component configs and the CLIP tokenizer that are not inside the
    checkpoint; they come from ``config`` (a local diffusers folder or a Hub id, default
    the SD1.5 repo), taken from the local cache when offline.
    """
    from diffusers import StableDiffusionPipeline

    cfg = str(config) if config is not None else SINGLE_FILE_CONFIG_REPO

    def load(local_files_only: bool):
        return StableDiffusionPipeline.from_single_file(
            str(path),
            config=cfg,
            dtype=dtype,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )

    try:
        return load(True)
    except Exception as first:  # noqa: BLE001
        if Path(cfg).is_dir():
            raise ModelLoadError(
                f"cannot load base model '{model}' as a single-file checkpoint with configs from '{cfg}': "
                f"{_one_line(first)}"
            ) from first
        if _hub_offline() or not _hub_reachable():
            raise ModelLoadError(
                f"cannot load base model '{model}': single-file loading needs the SD1.5 component configs and "
                f"tokenizer from '{cfg}' ({_one_line(first)}); with no network, download them once with "
                f"`huggingface-cli download {SINGLE_FILE_CONFIG_REPO} --exclude '*.safetensors' '*.ckpt' '*.bin'` "
                "or convert the file to a diffusers folder and pass --model PATH"
            ) from first
    try:
        return load(False)
    except Exception as exc:  # noqa: BLE001
        if _is_network_error(exc):
            raise ModelLoadError(
                f"cannot load base model '{model}': single-file loading needs the SD1.5 configs and tokenizer "
                f"from '{cfg}', which are not in the local Hugging Face cache and the Hub is unreachable; "
                f"download them first with `huggingface-cli download {SINGLE_FILE_CONFIG_REPO}` "
                "or pass --model PATH to a diffusers folder"
            ) from exc
        raise ModelLoadError(f"cannot load base model '{model}': {_one_line(exc)}") from exc


#: safetensors' dtype names of floating tensors -> torch dtypes
_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def stored_dtype(folder: Path, subfolder: str) -> torch.dtype | None:
    """The floating dtype a diffusers folder's component is stored in, read from its
    safetensors header (no weights are read); None when it cannot tell (no such file, a
    ``.bin`` file, mixed dtypes).

    Why: loading fp16 files as fp32 made the CPU widen every UNet weight (about 4 s on one
    thread; a GPU run uses one) before the trainer cast them to bf16 on the way to the card.
    Loaded as stored, the only cast is the last one, on the card, to the same values."""
    from safetensors import SafetensorError, safe_open

    part = Path(folder) / subfolder
    files = sorted(part.glob("*.safetensors"))
    files = [f for f in files if ".fp16." not in f.name and ".bf16." not in f.name] or files
    if not files:
        return None
    try:
        with safe_open(str(files[0]), "pt") as weights:  # reads the header only
            kinds = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    except (OSError, SafetensorError):
        return None
    floats = {_SAFETENSORS_FLOATS[k] for k in kinds if k in _SAFETENSORS_FLOATS}
    return floats.pop() if len(floats) == 1 else None


def _freeze(*modules) -> None:
    for m in modules:
        m.requires_grad_(False)


def load_pipeline(
    model: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
):
    """A StableDiffusionPipeline (safety checker off) for ``model``, resolved like ``load_components``.

    ``config`` only matters for single-file checkpoints (where diffusers reads component configs).
    """
    from diffusers import StableDiffusionPipeline

    source = resolve_model(model)
    if isinstance(source, Path) and source.is_file():
        pipe = _single_file_pipeline(source, model, dtype, config)
    else:

        def load(local_files_only: bool):
            return StableDiffusionPipeline.from_pretrained(
                source,
                dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=local_files_only,
            )

        pipe = _load_hub_or_folder(source, model, load)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_components(
    model: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
) -> Components:
    """Load UNet, VAE, text encoder, tokenizer and a DDPM noise scheduler, all base weights frozen.

    The noise scheduler is always a ``DDPMScheduler`` built from the model's scheduler config
    (as diffusers' training scripts do), whatever sampler the folder ships. ``dtype=None``: each
    component of a local diffusers folder as its files store it (:func:`stored_dtype`; fp32
    where that cannot be told), for a caller that casts them itself (the trainer, on the card).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model(model)
    if isinstance(source, Path) and source.is_file():
        pipe = _single_file_pipeline(source, model, dtype or torch.float32, config)
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:

        def dtype_of(subfolder: str) -> torch.dtype:
            if dtype is not None:
                return dtype
            stored = stored_dtype(source, subfolder) if isinstance(source, Path) and source.is_dir() else None
            return stored or torch.float32

        def load(local_files_only: bool):
            kw = {"local_files_only": local_files_only}
            return (
                UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype_of("unet"), **kw),
                AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype_of("vae"), **kw),
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype_of("text_encoder"), **kw),
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
                DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
            )

        unet, vae, text_encoder, tokenizer, noise_scheduler = _load_hub_or_folder(source, model, load)
    _freeze(unet, vae, text_encoder)
    vae.eval()
    text_encoder.eval()
    unet.to(device)
    vae.to(device)
    text_encoder.to(device)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    default_resolution = TINY_RESOLUTION if model == "tiny" else int(sample_size) * vae_scale_factor
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        model_id=model,
        vae_scale_factor=vae_scale_factor,
        default_resolution=default_resolution,
    )
