"""Sample grids: the base model against one or more runs' LoRAs, at fixed prompts and seeds.

The same seeds (a CPU ``torch.Generator``, so the noise is the same on any device) and the
same settings for every column make the grid a fair comparison: any difference between the
base column and a LoRA column comes from the LoRA. Everything needed to reproduce an image is
written to ``samples.json``.

Layout of ``out_dir`` (rebuilt as a whole each time, swapped in atomically)::

    grid.png                         rows = prompt x seed, columns = base / run names
    images/<column>_p<k>_s<seed>.png one file per image
    samples.json                     settings and one record per image
    .animelora-samples               marks the folder as this module's output

Only such a folder (or an empty or new one) is ever replaced: a folder holding anything else,
or a file, is refused before any model is loaded, so ``--out`` can never cost a user a file.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import textwrap
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lora.fsutil import make_temp_dir, swap_dir
from lora.owned import FolderKind, NotOursError, check_replaceable, record_files
from lora.runpaths import DIFFUSERS_WEIGHTS, SAMPLES_DIR, SAMPLES_GRID, SAMPLES_JSON, RunPaths

log = logging.getLogger(__name__)

#: The guide's style of test prompts: Danbooru tags, one subject, a style word.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "1girl, anime watercolor style, masterpiece",
    "1girl, soft focus landscape, anime style",
    "sketch, 1girl, monochrome, anime style",
    "1girl, solo, upper body, smile, cherry blossoms, anime style, best quality",
    "1boy, city street at night, neon lights, anime style, masterpiece",
)
#: Within the 77 tokens the CLIP text encoder reads, even with the tiny model's small
#: vocabulary (67 there, about 30 with SD1.5's): a longer default was cut silently.
DEFAULT_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, worst quality, "
                           "low quality, jpeg artifacts, signature, watermark, blurry")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1)
DEFAULT_STEPS = 20
TINY_STEPS = 4
LCM_STEPS = 4
LCM_GUIDANCE = 1.0
SCHEDULERS = ("euler_a", "dpm++", "euler", "ddim", "lcm")
BASE_COLUMN = "base"
#: The LCM-LoRA's adapter name beside the runs' ``run<i>`` adapters.
LCM_ADAPTER = "lcm"
#: The samples folder's own images/ (a run's ``samples/images/``; not a data set's).
IMAGES_DIR = "images"
#: Written into every samples folder: the folder is ours to replace on the next run.
OUT_MARKER = ".animelora-samples"
_MARKER_TEXT = ("Written by `animelora sample`. The next run with this output folder replaces the folder "
                "as a whole, as long as it holds only what animelora wrote.\n")


class SampleError(RuntimeError):
    """Sampling cannot start (a missing LoRA, LCM-LoRA or base model); one-line message."""


class SampleUsageError(SampleError):
    """The arguments cannot work (output folder, device, steps, prompts): a usage error."""


@dataclass(frozen=True)
class SampleImage:
    file: str  # relative to the samples folder
    column: str
    lora: str | None  # the run name whose LoRA made it, None for the base model
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    lora_scale: float | None
    width: int
    height: int


@dataclass
class SamplesResult:
    out_dir: Path
    grid_path: Path
    json_path: Path
    columns: list[str]
    images: list[SampleImage] = field(default_factory=list)

    def paths(self, column: str) -> list[Path]:
        return [self.out_dir / i.file for i in self.images if i.column == column]


def read_prompts(path: Path | str) -> list[str]:
    """Prompts from a file: a JSON list of strings, or one prompt per line (``#`` comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SampleError(f"{path}: cannot read prompts file ({exc.strerror or exc})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SampleError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
            raise SampleError(f"{path}: expected a JSON list of non-empty prompt strings")
        return [p.strip() for p in data]
    prompts = [line.strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SampleError(f"{path}: no prompts in the file")
    return prompts


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _lora_weight_file(run_dir: Path) -> Path:
    """The run's LoRA file: the diffusers one, else a kohya one."""
    paths = RunPaths(run_dir)
    lora_dir = paths.lora
    if paths.diffusers_weights.is_file():
        return paths.diffusers_weights
    others = paths.lora_files()
    if others:
        return others[0]
    raise SampleError(f"{lora_dir}: no LoRA weights ({DIFFUSERS_WEIGHTS} or *.safetensors); "
                      "has the run finished training?")


def _device(device: str) -> str:
    """The device to render on; one that does not exist here is a :class:`SampleUsageError`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SampleUsageError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SampleUsageError(f"device {device!r}: no CUDA device is available here; use cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise SampleUsageError(f"device {device!r}: this machine has {count} CUDA device(s) "
                                   f"(cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise SampleUsageError(f"device {device!r}: Apple MPS is not available here; use cpu or auto")
    elif dev.type != "cpu":
        raise SampleUsageError(f"device {device!r} is not supported for sampling; use auto, cpu, cuda or cuda:N")
    return device


#: A samples folder (lora/owned.py): rebuilt whole, so it may hold only what sampling wrote.
#: ``legacy``: what sampling wrote before folders had a ledger (its marker file included).
SAMPLES_FOLDER = FolderKind("a samples folder", legacy=(
    OUT_MARKER, SAMPLES_JSON, SAMPLES_GRID, f"{IMAGES_DIR}/*.png"))


def check_out_dir(out_dir: Path | str, run_dirs: Sequence[Path] = ()) -> Path:
    """The resolved output folder, if writing there can lose nothing; else :class:`SampleUsageError`.

    Accepted: a new folder, an empty one, or an earlier samples folder of ours that holds
    nothing else. Refused: a file, a folder with anything of someone else's in it, the current
    folder or one above it, a run folder or one above a run folder.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SampleUsageError(f"output folder {out} is a file; name a folder (a file is never replaced)")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise SampleUsageError(f"output folder {out} is the current folder or holds it; name a new "
                               f"sub-folder such as {out / SAMPLES_DIR}")
    for run in run_dirs:
        run = Path(run).expanduser().resolve()
        if out == run or out in run.parents:
            raise SampleUsageError(f"output folder {out} is (or holds) the run folder {run}; name a new "
                                   f"sub-folder such as {RunPaths(run).samples}")
    try:
        check_replaceable(out, SAMPLES_FOLDER, hint="or name another folder")
    except NotOursError as exc:
        raise SampleUsageError(str(exc)) from None
    return out


def _set_scheduler(pipe: Any, name: str) -> None:
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


def make_scheduler(name: str, config: Any) -> Any:
    """The sampler ``name`` (:data:`SCHEDULERS`) built from a model's scheduler ``config``; the
    trainer's samples (lora/train/samples.py) draw with ``dpm++`` from here too."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "lcm":
        return LCMScheduler.from_config(config)
    raise SampleError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def make_grid(
    images: Sequence[Sequence[Path]],
    columns: Sequence[str],
    row_labels: Sequence[str],
    out_png: Path,
    *,
    min_cell: int = 192,
) -> Path:
    """A labelled grid: a header row of column names, a label column of prompt and seed.

    Small images (the tiny model's 64 px) are enlarged with nearest-neighbour so the grid
    stays readable; the per-image files keep their real size.
    """
    from PIL import Image, ImageDraw

    first = Image.open(images[0][0])
    w, h = first.size
    scale = max(1, -(-min_cell // max(w, h)))  # ceil
    cw, ch = w * scale, h * scale
    pad, label_w, header_h = 6, 260, 34
    font, small = _font(15), _font(12)
    grid = Image.new("RGB", (label_w + len(columns) * (cw + pad) + pad,
                             header_h + len(images) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        x = label_w + pad + c * (cw + pad)
        text = name if len(name) <= 28 else name[:27] + "…"
        draw.text((x + cw // 2, header_h // 2), text, fill="black", font=font, anchor="mm")
    for r, (row, label) in enumerate(zip(images, row_labels)):
        y = header_h + pad + r * (ch + pad)
        lines = [w for part in label.split("\n") for w in textwrap.wrap(part, width=34)]
        lines = lines[:max(1, ch // 16)]
        draw.multiline_text((pad, y + 2), "\n".join(lines), fill="black", font=small, spacing=3)
        for c, path in enumerate(row):
            with Image.open(path) as img:
                cell = img.convert("RGB").resize((cw, ch), Image.NEAREST if scale > 1
                                                 else Image.BICUBIC)
            grid.paste(cell, (label_w + pad + c * (cw + pad), y))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png, format="PNG")
    return out_png


def _progress(total: int, progress: Callable[[int, int], None] | None):
    """A tqdm bar on a terminal, or calls to ``progress(done, total)``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total, desc="samples", unit="img",
               disable=not sys.stderr.isatty()) if tqdm else None
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if bar is not None:
            bar.update(1)
        if progress is not None:
            progress(done, total)

    def close() -> None:
        if bar is not None:
            bar.close()

    return tick, close


def long_prompts(tokenizer: Any, prompts: Sequence[str], negative_prompt: str | None) -> list[str]:
    """One line for each prompt longer than the text encoder reads (77 CLIP tokens for SD1.5),
    naming what it will ignore. Why: the pipeline cuts such a prompt silently (the negative
    prompt) or with a multi-line warning, and the images then ignore the tags at the end."""
    limit = int(tokenizer.model_max_length)
    labelled = [(f"prompt {i + 1}", p) for i, p in enumerate(prompts)]
    labelled += [("negative prompt", negative_prompt)] if negative_prompt else []
    lines = []
    for label, text in labelled:
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            ignored = _ignored_text(tokenizer, text, ids, limit)
            shown = ignored if len(ignored) <= 60 else "..." + ignored[-57:]
            lines.append(f"{label} is {len(ids)} CLIP tokens, over the {limit} the text encoder "
                         f"reads: \"{shown}\" is ignored; shorten it")
    return lines


def _ignored_text(tokenizer: Any, text: str, ids: Sequence[int], limit: int) -> str:
    """The part of ``text`` past the ``limit`` tokens (start and end tokens count), as written."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, truncation=False, verbose=False,
                            return_offsets_mapping=True)["offset_mapping"]
        return text[offsets[limit - 1][0]:].strip()
    return " ".join(tokenizer.decode(ids[limit - 1:], skip_special_tokens=True).split())


#: diffusers' own warning about a cut prompt (several lines, the cut text in tokens).
_DIFFUSERS_TRUNCATION = "was truncated because CLIP can only handle"


def _drop_diffusers_truncation(record: logging.LogRecord) -> bool:
    return _DIFFUSERS_TRUNCATION not in record.getMessage()


def _warn_long_prompts(pipe: Any, prompts: Sequence[str], negative_prompt: str | None) -> None:
    """Say once, in one line per prompt, what the text encoder will not read (instead of
    diffusers' warning at every batch)."""
    lines = long_prompts(pipe.tokenizer, prompts, negative_prompt)
    for line in lines:
        log.warning(line)
    pipeline_log = logging.getLogger(type(pipe).__module__)
    if lines and _drop_diffusers_truncation not in pipeline_log.filters:
        pipeline_log.addFilter(_drop_diffusers_truncation)


@dataclass(frozen=True)
class SampleRequest:
    """What to render, apart from where (runs, base model, output folder, device).

    Why an object: the command line, the flow's task and the tests ask for the same ten
    settings; one typed value passes them whole, and :meth:`resolve` turns its defaults into the
    numbers ``samples.json`` records. ``None`` means the default for the base model:
    ``prompts`` the guide's prompts (the first run's trigger word put first, as users will prompt
    the LoRA; prompts given explicitly are used as written), ``steps`` 20 (4 for the tiny model or
    with LCM-LoRA), ``guidance`` 7 (1 with LCM-LoRA), ``resolution`` 512 (the tiny model's own
    size for "tiny"). ``lcm_lora``: a local LCM-LoRA file or folder; it switches to the LCM
    scheduler, few steps and guidance about 1. ``trigger_word`` (default: the one the first run's
    kohya file records) only changes the default prompts. An empty ``negative_prompt`` is none.
    """

    prompts: tuple[str, ...] | None = None
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int | None = None
    guidance: float | None = None
    scheduler: str = "euler_a"
    lora_scale: float = 1.0
    resolution: int | None = None
    lcm_lora: Path | None = None
    trigger_word: str | None = None

    def __post_init__(self) -> None:
        # lists from a command line or JSON become tuples, so the request stays immutable
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "lcm_lora", Path(self.lcm_lora) if self.lcm_lora else None)

    def resolve(self, base_model: str, runs: Sequence[Path]) -> "SampleSettings":
        """The concrete settings for ``base_model``; a request that cannot work is refused here,
        before any model loads (:class:`SampleUsageError`, a missing LCM-LoRA :class:`SampleError`)."""
        lcm = _lcm_path(self.lcm_lora)
        tiny = base_model == "tiny"
        settings = SampleSettings(
            prompts=_checked_prompts(self._prompts(runs)),
            negative_prompt=self.negative_prompt,
            seeds=_checked_seeds(self.seeds),
            steps=int(_first(self.steps, LCM_STEPS if lcm else TINY_STEPS if tiny else DEFAULT_STEPS)),
            guidance=float(_first(self.guidance, LCM_GUIDANCE if lcm else 7.0)),
            scheduler="lcm" if lcm else self.scheduler,
            lora_scale=self.lora_scale,
            resolution=int(_first(self.resolution, _tiny_resolution() if tiny else 512)),
            lcm_lora=lcm,
        )
        settings.check()
        return settings

    def _prompts(self, runs: Sequence[Path]) -> Sequence[str]:
        if self.prompts is not None:
            return self.prompts
        from lora.hub.runinfo import kohya_trigger_phrase

        trigger = self.trigger_word or kohya_trigger_phrase(RunPaths(runs[0]).lora_files())
        return [f"{trigger}, {p}" if trigger else p for p in DEFAULT_PROMPTS]


def grid_rows(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, int]]:
    """``(prompt index, seed)`` of every image, prompt by prompt: the rows of a samples grid,
    ``animelora sample``'s and the overview of the samples drawn while training alike."""
    return [(p, seed) for p in range(len(prompts)) for seed in seeds]


def row_label(prompt: str, seed: int) -> str:
    """A samples grid's label of one row (:func:`make_grid` wraps it)."""
    return f"{prompt}\nseed {seed}"


@dataclass(frozen=True)
class SampleSettings:
    """A :class:`SampleRequest` with every default decided: what ``samples.json`` records."""

    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    scheduler: str
    lora_scale: float
    resolution: int
    lcm_lora: Path | None

    def check(self) -> None:
        if self.steps <= 0 or self.resolution <= 0 or self.resolution % 8:
            raise SampleUsageError(f"steps must be > 0 and resolution a positive multiple of 8 "
                                   f"(got {self.steps}, {self.resolution})")
        if self.scheduler not in SCHEDULERS:
            raise SampleUsageError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")

    @property
    def jobs(self) -> list[tuple[int, int]]:
        """``(prompt index, seed)`` of each image of a column, in the grid's row order."""
        return grid_rows(self.prompts, self.seeds)

    def row_labels(self) -> list[str]:
        return [row_label(self.prompts[p], seed) for p, seed in self.jobs]


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def _tiny_resolution() -> int:
    from lora.model import TINY_RESOLUTION

    return TINY_RESOLUTION


def _checked_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    prompts = tuple(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SampleUsageError("prompts must be a non-empty list of non-empty strings")
    return prompts


def _checked_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    """The seeds in order, each once (a repeated seed would render the same image twice)."""
    unique = tuple(dict.fromkeys(int(s) for s in seeds))
    if not unique:
        raise SampleUsageError("at least one seed is needed")
    return unique


def _lcm_path(lcm_lora: Path | None) -> Path | None:
    if lcm_lora is not None and not lcm_lora.exists():
        raise SampleError(f"LCM-LoRA weights not found at {lcm_lora}: download "
                          f"latent-consistency/lcm-lora-sdv1-5 ({DIFFUSERS_WEIGHTS}) "
                          "there, or sample without --lcm-lora")
    return lcm_lora


def generate_samples(
    base_model: str,
    run_dirs: Sequence[Path | str] | Path | str,
    out_dir: Path | str,
    request: SampleRequest = SampleRequest(),
    *,
    device: str = "auto",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> SamplesResult:
    """Render base-model and LoRA images at ``request``'s prompts and seeds; write grid and JSON.

    ``run_dirs``: one run folder or several; each must hold ``lora/*.safetensors``. Everything
    that can be refused (the runs, the request, the device, ``out_dir``) is checked before the
    model loads. ``batch_size`` images are rendered per pipeline call, each with its own seeded
    generator; ``progress(done, total)`` is called after each image.
    """
    runs = _run_folders(run_dirs)
    weights = [_lora_weight_file(run) for run in runs]
    settings = request.resolve(base_model, runs)
    dev = _device(device)
    out = check_out_dir(out_dir, runs)  # before the model loads: a refusal costs nothing
    pipe = _pipeline(base_model, dev, settings, weights)
    columns = [BASE_COLUMN, *_unique([run.name for run in runs])]
    with _building(out, runs) as folder:
        records = _render(pipe, settings, columns, folder, max(1, int(batch_size)), progress)
        _describe(folder, base_model, dev, settings, columns, records)
    log.info("wrote %d sample images and %s", len(records), out / SAMPLES_GRID)
    shown = Path(out_dir)
    return SamplesResult(out_dir=shown, grid_path=shown / SAMPLES_GRID, json_path=shown / SAMPLES_JSON,
                         columns=columns, images=records)


def _run_folders(run_dirs: Sequence[Path | str] | Path | str) -> list[Path]:
    runs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(r) for r in run_dirs]
    if not runs:
        raise SampleUsageError("no run folder given to sample")
    return runs


def _pipeline(base_model: str, dev: str, settings: SampleSettings, weights: Sequence[Path]) -> Any:
    """The base model on ``dev`` with the scheduler and every run's LoRA (and the LCM-LoRA)."""
    import torch

    from lora.model import load_pipeline

    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    pipe = load_pipeline(base_model, dtype=dtype, device=dev)
    _set_scheduler(pipe, settings.scheduler)
    _warn_long_prompts(pipe, settings.prompts, settings.negative_prompt)
    for i, weight in enumerate(weights):
        _load_lora(pipe, weight.parent, {"weight_name": weight.name}, _adapter(i), weight, "LoRA")
    if settings.lcm_lora is not None:
        lcm = settings.lcm_lora
        folder, kw = (lcm.parent, {"weight_name": lcm.name}) if lcm.is_file() else (lcm, {})
        _load_lora(pipe, folder, kw, LCM_ADAPTER, lcm, "LCM-LoRA")
    return pipe


def _adapter(run_index: int) -> str:
    return f"run{run_index}"


def _load_lora(pipe: Any, folder: Path, kw: dict[str, str], adapter: str, shown: Path, what: str) -> None:
    """One LoRA as its own adapter; a file that does not load is named in one line."""
    try:
        with warnings.catch_warnings():
            # Several adapters on one UNet is the point here, not a mistake.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(folder), adapter_name=adapter, **kw)
    except Exception as exc:  # noqa: BLE001 - name the file in one line
        raise SampleError(f"{shown}: cannot load {what} ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]})") from exc


@contextmanager
def _building(out: Path, runs: Sequence[Path]) -> Iterator[Path]:
    """A hidden sibling of ``out`` to write in, swapped in whole when the block ends and removed
    when it fails (the write policy, lora/owned.py: ``out`` never holds half a samples folder)."""
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
        record_files(tmp)  # the ledger: the next run may replace exactly these files
        check_out_dir(out, runs)  # nothing of anyone else's arrived while rendering
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _render(pipe: Any, settings: SampleSettings, columns: Sequence[str], folder: Path, batch_size: int,
            progress: Callable[[int, int], None] | None) -> list[SampleImage]:
    """Every image, column by column (one adapter switch per column), each column in the
    order of :attr:`SampleSettings.jobs`."""
    (folder / IMAGES_DIR).mkdir()
    jobs = settings.jobs
    tick, close = _progress(len(columns) * len(jobs), progress)
    records: list[SampleImage] = []
    try:
        for c, column in enumerate(columns):
            lora = None if c == 0 else column
            _activate(pipe, None if c == 0 else _adapter(c - 1), settings.lora_scale,
                      settings.lcm_lora is not None)
            for start in range(0, len(jobs), batch_size):
                for record in _render_batch(pipe, settings, column, lora, jobs[start:start + batch_size], folder):
                    records.append(record)
                    tick()
    finally:
        close()
    return records


def _render_batch(pipe: Any, settings: SampleSettings, column: str, lora: str | None,
                  chunk: Sequence[tuple[int, int]], folder: Path) -> list[SampleImage]:
    """One pipeline call for ``chunk``'s (prompt, seed) pairs, each image saved and recorded."""
    import torch

    # One generator per image: the same seed gives the same starting noise in every column
    # and on every device.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
    negative = settings.negative_prompt
    with torch.inference_mode():
        images = pipe([settings.prompts[p] for p, _ in chunk],
                      negative_prompt=[negative] * len(chunk) if negative else None,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                      height=settings.resolution, width=settings.resolution, generator=generators).images
    records = []
    for (p, seed), image in zip(chunk, images):
        rel = f"{IMAGES_DIR}/{_slug(column)}_p{p}_s{seed}.png"
        image.save(folder / rel, format="PNG")
        records.append(SampleImage(
            file=rel, column=column, lora=lora, prompt=settings.prompts[p], negative_prompt=negative,
            seed=seed, steps=settings.steps, guidance=settings.guidance, scheduler=settings.scheduler,
            lora_scale=None if lora is None else settings.lora_scale, width=image.width, height=image.height))
    return records


def _describe(folder: Path, base_model: str, dev: str, settings: SampleSettings, columns: list[str],
              records: list[SampleImage]) -> None:
    """The grid, ``samples.json`` (everything needed to render each image again) and the marker."""
    per_column = len(records) // len(columns)  # _render's order: column by column
    rows = [[folder / records[c * per_column + j].file for c in range(len(columns))]
            for j in range(per_column)]
    make_grid(rows, columns, settings.row_labels(), folder / SAMPLES_GRID)
    meta = {
        "base_model": base_model, "runs": columns[1:], "columns": columns,
        "prompts": list(settings.prompts), "negative_prompt": settings.negative_prompt,
        "seeds": list(settings.seeds), "steps": settings.steps, "guidance": settings.guidance,
        "scheduler": settings.scheduler, "lora_scale": settings.lora_scale,
        "resolution": settings.resolution, "lcm_lora": settings.lcm_lora is not None,
        "device": dev, "grid": SAMPLES_GRID, "images": [asdict(r) for r in records],
    }
    (folder / SAMPLES_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (folder / OUT_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")


def _activate(pipe: Any, adapter: str | None, scale: float, lcm: bool) -> None:
    """Base column: LoRAs off (only LCM on when used); a run column: that LoRA at ``scale``."""
    if adapter is None and not lcm:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    names = ([adapter] if adapter else []) + ([LCM_ADAPTER] if lcm else [])
    weights = ([scale] if adapter else []) + ([1.0] if lcm else [])
    pipe.set_adapters(names, adapter_weights=weights)


def _unique(names: list[str]) -> list[str]:
    """Column labels: run names, made unique when two runs share a name."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name == BASE_COLUMN:
            name = f"{name}-run"
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out
