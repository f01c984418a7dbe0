"""Sample images while a run trains: fixed prompts and seeds, drawn by the training UNet itself.

Why in the trainer and not a second pipeline: a second UNet would double the largest part of
the memory a run holds. A set is drawn by the very UNet being trained, with the LoRA weights as
they are after the step, in eval mode (no LoRA dropout) and under the run's autocast; train mode
and cuDNN's benchmark setting are put back afterwards. The CUDA graphs of the step are not
touched: they replay the same parameter tensors, which sampling only reads.

Why this never changes training: every draw comes from its own CPU generator seeded by the
sample's seed (the same starting noise as ``animelora sample`` at that seed and size), the
sampler (DPM++ 2M, Karras sigmas) adds no noise of its own, and the global CPU and CUDA
random states are saved and restored around a set anyway. A resumed run therefore trains
bit-identically whether or not sets were drawn, and draws the same sets.

On disk (lora/runpaths.py names them; each folder is rebuilt whole through lora/owned.py, so
something a user put there is refused, never deleted)::

    training_samples/step-<n>/        p<k>_s<seed>.png, samples.json (settings, step, images)
    training_samples/overview/grid.png every set so far: rows prompt x seed, one column per step
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import tempfile
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lora.config import ConfigError, SampleOptions
from lora.owned import FolderKind, build_folder
from lora.runpaths import SAMPLES_JSON, RunPaths
from lora.sample import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPTS, TINY_STEPS, SampleError, grid_rows, \
    long_prompts, make_grid, make_scheduler, read_prompts, row_label
from lora.train.data.cache import encode_prompts
from lora.train.data.fitting import fitting_batches

log = logging.getLogger(__name__)

#: Denoising steps of a set (DPM++ 2M with Karras sigmas converges in 15-25); the tiny model's
#: images are noise at any count, so it takes lora/sample.py's few.
DEFAULT_STEPS = 20
#: Default prompts the tiny model draws (the first of lora/sample.py's): its images are noise
#: whatever the prompt, and its runs (the tests', ``make demo``) are seconds long; five prompts
#: doubled a tiny run's time, one keeps every part of a set (UNet, VAE, files, overview) at work.
TINY_PROMPTS = 1
#: Images drawn per UNet call (each twice with classifier-free guidance); an out-of-memory
#: error halves it for the rest of the segment, low_memory draws one at a time.
IMAGES_PER_CALL = 5
#: Columns of the overview grid: the first set, the last, and evenly spaced ones between.
OVERVIEW_COLUMNS = 10
#: Longest side of an image in the overview grid (it grows with every set).
OVERVIEW_CELL = 256
#: A folder of one set, and the overview: rebuilt whole, holding only what sampling wrote.
SET_FOLDER = FolderKind("a set of samples drawn while training")
OVERVIEW_FOLDER = FolderKind("the overview of the samples drawn while training")


@dataclass(frozen=True)
class TrainingSampleSettings:
    """What every set of a segment draws (resolved from :class:`~lora.config.SampleOptions`)."""

    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    resolution: int

    @property
    def rows(self) -> list[tuple[int, int]]:
        """(prompt index, seed) of every image, in the order they are drawn and shown."""
        return grid_rows(self.prompts, self.seeds)


def resolve_settings(opts: SampleOptions, *, tiny: bool, resolution: int, trigger: str | None) -> TrainingSampleSettings:
    """The settings of a segment's sets; an unreadable prompt file is a :class:`ConfigError`
    (checked when the segment starts, before any model loads)."""
    if opts.prompts_file:
        try:
            path = Path(opts.prompts_file).expanduser()
            prompts = [_without_kohya_options(p, path) for p in read_prompts(path)]
        except SampleError as exc:
            raise ConfigError(f"invalid training config: samples.prompts_file: {exc}") from None
    elif opts.prompts:
        prompts = [p.strip() for p in opts.prompts]
    else:
        defaults = DEFAULT_PROMPTS[:TINY_PROMPTS] if tiny else DEFAULT_PROMPTS
        prompts = [f"{trigger}, {p}" if trigger else p for p in defaults]
    steps = opts.steps or (TINY_STEPS if tiny else DEFAULT_STEPS)
    negative = DEFAULT_NEGATIVE_PROMPT if opts.negative_prompt is None else opts.negative_prompt
    return TrainingSampleSettings(tuple(prompts), negative, tuple(dict.fromkeys(opts.seeds)), steps, float(opts.guidance),
                          opts.resolution or resolution)


#: kohya's per-line options in a prompt file (``1girl, smile --n lowres --w 512 --d 3``).
_KOHYA_OPTION = re.compile(r"\s--([a-z]+)\b")


def _without_kohya_options(line: str, path: Path) -> str:
    """The prompt of a line of kohya's prompt file, its ``--n`` / ``--w`` / ``--d`` ... options
    cut off with a warning: every set draws with the ``samples`` settings (one negative prompt,
    size, steps and seeds for all), and an option left in the text would be drawn as words."""
    found = _KOHYA_OPTION.search(f" {line}")
    if found is None:
        return line
    prompt = line[:max(0, found.start() - 1)].strip()
    options = ", ".join(f"--{name}" for name in _KOHYA_OPTION.findall(f" {line}"))
    if not prompt:
        raise SampleError(f"{path}: a line holds options only ({line.strip()!r})")
    log.warning("samples while training: %s ignored in %r (samples.negative_prompt, samples.seeds, "
                "samples.steps, samples.guidance and samples.resolution apply to every prompt)", options, prompt)
    return prompt


@dataclass
class SamplerModels:
    """The parts of the training set-up a set is drawn with (the UNet is the trained one)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    vae: torch.nn.Module
    noise_scheduler: Any
    device: torch.device
    autocast: Callable[[], AbstractContextManager] = nullcontext


@dataclass(frozen=True)
class SampleSet:
    """One set on disk; ``record`` is what the training log keeps of it."""

    step: int
    epoch: int
    folder: Path
    images: list[Path]
    overview: Path | None
    seconds: float

    @property
    def record(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "images": len(self.images),
                "seconds": round(self.seconds, 3)}


class Sampler:
    """Draws a set with the training models and writes it into the run folder."""

    def __init__(self, models: SamplerModels, settings: TrainingSampleSettings, run_dir: Path, *,
                 images_per_call: int = IMAGES_PER_CALL) -> None:
        self.models, self.settings, self.paths = models, settings, RunPaths(run_dir)
        self.images_per_call = images_per_call
        self.thumbnails = Thumbnails()
        for line in long_prompts(models.tokenizer, settings.prompts, settings.negative_prompt):
            log.warning("samples while training: %s", line)

    def draw_set(self, step: int, epoch: int, done_steps: Sequence[int]) -> SampleSet:
        """Draw the set of global step ``step``, write it and the overview grid (``done_steps``:
        the steps whose sets were drawn before, for the overview)."""
        t = time.monotonic()
        images = self.render()
        folder = self.paths.training_sample_set(step)
        files = self._write_set(folder, step, epoch, images)
        overview = write_overview(self.paths, sorted({*done_steps, step}), self.settings, self.thumbnails)
        seconds = time.monotonic() - t
        log.info("samples at step %d: %d images in %.1f s (%s)", step, len(files), seconds, folder)
        return SampleSet(step, epoch, folder, files, overview, seconds)

    def strip(self, drawn: SampleSet) -> Any:
        """``drawn``'s images side by side for TensorBoard, from the copies the overview made
        of them (each image is shrunk once, not once for the grid and once for the strip)."""
        return tile([self.thumbnails.of(path) for path in drawn.images])

    # -- drawing ----------------------------------------------------------------------------

    def render(self) -> list[Any]:
        """Every image of the settings (PIL), in :attr:`TrainingSampleSettings.rows` order."""
        m, s = self.models, self.settings
        with _sampling_state(m), torch.no_grad():
            cond, uncond = self._text()
            out: list[Any] = [None] * len(s.rows)
            batches = fitting_batches([list(range(len(s.rows)))], self.images_per_call,
                                      lambda batch: self._draw(batch, cond, uncond), device=m.device,
                                      what="drawing samples", on_smaller=self._smaller)
            for batch, images in batches:
                for i, image in zip(batch, images):
                    out[i] = image
        return out

    def _smaller(self, images: int) -> None:
        self.images_per_call = images

    def _text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' and the negative prompt's embeddings, by the text encoder as trained so far."""
        m, s = self.models, self.settings
        te_device = next(m.text_encoder.parameters()).device
        with m.autocast():
            cond = encode_prompts(m.tokenizer, m.text_encoder, list(s.prompts), te_device)
            uncond = encode_prompts(m.tokenizer, m.text_encoder, [s.negative_prompt], te_device)
        return cond.to(m.device), uncond.to(m.device)

    def _draw(self, batch: list[int], cond_all: torch.Tensor, uncond: torch.Tensor) -> list[Any]:
        """The images ``batch`` (indices into the rows): denoise, then decode one by one."""
        m, s = self.models, self.settings
        rows = [s.rows[i] for i in batch]
        scale = _vae_scale(m.vae)
        side = s.resolution // scale
        # one CPU generator per image: the same seed gives the same noise on any device and
        # in any batch (as diffusers' pipelines and `animelora sample` draw it)
        noise = torch.cat([torch.randn((1, 4, side, side), generator=torch.Generator("cpu").manual_seed(seed))
                           for _, seed in rows])
        scheduler = make_scheduler("dpm++", m.noise_scheduler.config)
        scheduler.set_timesteps(s.steps, device=m.device)
        latents = noise.to(m.device) * scheduler.init_noise_sigma
        cond = cond_all[[p for p, _ in rows]]
        guided = s.guidance != 1.0
        ehs = torch.cat([uncond.expand(len(rows), -1, -1), cond]) if guided else cond
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t)
            with m.autocast():
                pred = m.unet(x, t, ehs, return_dict=False)[0].float()
            if guided:
                uncond, text = pred.chunk(2)
                pred = uncond + s.guidance * (text - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> list[Any]:
        """PIL images; the VAE comes to the device for this (in fp32: SD's VAE overflows in fp16)
        and goes back, one image at a time so a set never needs more memory than one decode."""
        from PIL import Image

        vae, device = self.models.vae, self.models.device
        home = next(vae.parameters()).device
        scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        images = []
        try:
            vae.to(device)
            for lat in latents:
                pixels = vae.decode(lat.unsqueeze(0).float() / scaling, return_dict=False)[0]
                arr = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                images.append(Image.fromarray(arr))
        finally:
            vae.to(home)
        return images

    # -- writing ----------------------------------------------------------------------------

    def _write_set(self, folder: Path, step: int, epoch: int, images: list[Any]) -> list[Path]:
        s = self.settings
        names = [f"p{p}_s{seed}.png" for p, seed in s.rows]
        folder.parent.mkdir(parents=True, exist_ok=True)
        with build_folder(folder, SET_FOLDER, hint="or turn samples off (--set samples=off)") as tmp:
            for name, image in zip(names, images):
                # zlib's fastest level: 18 against 51 ms an image at 512 px, files ~13% larger;
                # a set is written while training waits
                image.save(tmp / name, format="PNG", compress_level=1)
            meta = {"step": step, "epoch": epoch, **asdict(s),
                    "scheduler": "dpm++ 2m karras",
                    "images": [{"file": name, "prompt": s.prompts[p], "seed": seed}
                               for name, (p, seed) in zip(names, s.rows)]}
            (tmp / SAMPLES_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return [folder / name for name in names]


def _vae_scale(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@contextlib.contextmanager
def _sampling_state(m: SamplerModels):
    """Eval mode, cuDNN's heuristics and a saved RNG state for the set; all put back afterwards."""
    modules = [m.unet, m.text_encoder]
    modes = [mod.training for mod in modules]
    benchmark = torch.backends.cudnn.benchmark
    devices = [m.device] if m.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            for mod in modules:
                mod.eval()
            # cuDNN's benchmark would time every convolution again for the set's new shapes
            torch.backends.cudnn.benchmark = False
            yield
        finally:
            for mod, mode in zip(modules, modes):
                mod.train(mode)
            torch.backends.cudnn.benchmark = benchmark


# -- when a set is due ------------------------------------------------------------------------


def sample_epochs(opts: SampleOptions, steps_per_epoch: int, total_steps: int) -> set[int] | None:
    """The epochs at whose end a set is due, or None when the cadence counts steps.

    The default spreads ``sets`` sets evenly over the run's epochs (a last, partial epoch
    counts): phase2a's 20 epochs get sets after epochs 5, 10, 15 and 20.
    """
    if opts.every_steps:
        return None
    epochs = max(1, math.ceil(total_steps / max(1, steps_per_epoch)))
    if opts.every_epochs:
        return set(range(opts.every_epochs, epochs + 1, opts.every_epochs))
    return {max(1, math.ceil(epochs * i / opts.sets)) for i in range(1, opts.sets + 1)}


# -- the overview ------------------------------------------------------------------------------


def _set_meta(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / SAMPLES_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def overview_steps(steps: Sequence[int], limit: int = OVERVIEW_COLUMNS) -> list[int]:
    """At most ``limit`` of ``steps`` (sorted): the first, the last and evenly spaced between."""
    steps = sorted(set(steps))
    if len(steps) <= limit:
        return steps
    picks = {round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)}
    return [steps[i] for i in sorted(picks)]


class Thumbnails:
    """Overview-sized copies of the sets' images, each made once in a segment.

    Why: the overview is rebuilt after every set from every set shown; shrinking each earlier
    set's images again every time made each set slower than the last (2.4 s to 4.25 s over the
    five sets of a 20-epoch run on an H100, bench/README.md). A copy is keyed by the image's
    path, size and modification time, so a set rewritten since is shrunk again."""

    def __init__(self) -> None:
        folder = tempfile.TemporaryDirectory(prefix="animelora-thumbs-")
        # cleaned up with the sampler, explicitly (one left to the collector warns)
        weakref.finalize(self, folder.cleanup)
        self._folder = Path(folder.name)
        self._made: dict[tuple[str, int, int], Path] = {}

    def of(self, path: Path) -> Path:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        made = self._made.get(key)
        if made is None:
            made = _thumbnail(path, self._folder / f"{len(self._made)}.png")
            self._made[key] = made
        return made


def write_overview(paths: RunPaths, steps: Sequence[int], settings: TrainingSampleSettings,
                   thumbnails: Thumbnails | None = None) -> Path | None:
    """``training_samples/overview/grid.png``: the sets of ``steps`` drawn with these settings,
    one column per step (sets drawn with other prompts or seeds before a resume are left out).
    ``thumbnails``: the copies made for earlier overviews (a :class:`Sampler` keeps them)."""
    rows = [(settings.prompts[p], seed) for p, seed in settings.rows]
    columns: list[tuple[int, dict[str, Path]]] = []
    for step in steps:
        meta = _set_meta(paths.training_sample_set(step))
        if meta is None:
            continue
        files = {(i.get("prompt"), i.get("seed")): paths.training_sample_set(step) / str(i.get("file"))
                 for i in meta.get("images", []) if isinstance(i, dict)}
        if all(key in files and files[key].is_file() for key in rows):
            columns.append((step, {f"{p}\0{s}": files[(p, s)] for p, s in rows}))
    shown = set(overview_steps([step for step, _ in columns]))
    columns = [c for c in columns if c[0] in shown]
    if not columns:
        return None
    thumbnails = thumbnails or Thumbnails()
    with build_folder(paths.training_samples_overview, OVERVIEW_FOLDER) as tmp:
        cells = [[thumbnails.of(files[f"{p}\0{s}"]) for _, files in columns] for p, s in rows]
        make_grid(cells, [f"step {step}" for step, _ in columns], [row_label(p, s) for p, s in rows],
                  tmp / paths.training_samples_grid.name)
    return paths.training_samples_grid


def _thumbnail(path: Path, out: Path) -> Path:
    """``path`` no larger than :data:`OVERVIEW_CELL` (a copy at ``out``), so the grid stays small."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((OVERVIEW_CELL, OVERVIEW_CELL))
        image.save(out, format="PNG", compress_level=1)  # a temporary copy: fast, not small
    return out


def tile(images: Sequence[Path]) -> "Any":
    """``images`` side by side (no labels), as an HWC uint8 array for TensorBoard; a
    :class:`Sampler` passes its overview-sized copies (:meth:`Sampler.strip`)."""
    import numpy as np
    from PIL import Image

    opened = []
    for path in images:
        with Image.open(path) as image:
            opened.append(image.convert("RGB"))
    h = max(i.height for i in opened)
    strip = Image.new("RGB", (sum(i.width for i in opened), h), "white")
    x = 0
    for image in opened:
        strip.paste(image, (x, 0))
        x += image.width
    return np.asarray(strip)
