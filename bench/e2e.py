"""Benchmark: time to a trained LoRA on Danbooru-shaped data, against the diffusers script and kohya.

What a user feels is the wall time from `animelora train` to the LoRA file, on their data:
images in many aspect ratios (so many bucket shapes and partial batches), a model load, a
latent cache, compile and CUDA-graph warm-up, then the steps. This script builds such a data
set (random pixels, Danbooru-like sizes) and a random-weight SD1.5 model folder, runs the whole
`animelora train` command end to end for each variant, and runs the peers on the same images
and model weights, on the same GPU, in the same call, one after the other: diffusers' own
example script `examples/text_to_image/train_text_to_image_lora.py` (``--peer-script``) and
kohya sd-scripts' `train_network.py` (``--kohya``, with its pinned packages from
``--kohya-site``: kohya's recommended settings, cached latents, SDPA, aspect buckets, fp16).
Neither is part of this repository: bench/peers/README.md says how to get them and their
packages onto a GPU machine. It prints one table:

    wall s        the command's whole run (process start to exit)
    1st step s    process start to the first optimizer step read back
    warm-up s     compile + CUDA-graph capture (first step minus set-up; the step-0 validation too)
    steps s       every step's own time after the first
    steps %       steps s over wall s
    validation s  the held-out images' evaluations (step 0 and each epoch's end)
    samples s     the sets of samples drawn while training (``-``: none; ``nosamples``)
    images/s      steady rate (steps after the warm-up)
    reserved GiB  torch's peak reserved memory while training (graph pools included; the
                  set-up's peak, the VAE building the latent cache, is in the JSON row)
    smi GiB       the card's peak used memory seen by nvidia-smi (all the process holds)
    x script      the script's (projected) wall time over this row's
    x kohya       kohya's (projected) wall time over this row's

Each peer is run for ``--peer-steps`` steps (600 by default; the rate is read over the last 90%
of them); its time for the run's full step count is projected as start-up + steps / steady rate
+ the time after its last step (said in the table). A row of ours run for fewer epochs
(``default@5``) is projected the same way, from its own step time, validations and sample sets
(``project_full``), and compared with the peers by that; its wall cell says so.

    python bench/e2e.py [--peer-script PATH] [--kohya DIR --kohya-site DIR] [--shapes danbooru|many]
                        [--epochs 20] [--variants default,default_warm,fp16,lowmem]
    python bench/e2e.py --smoke    # CPU: tiny model, 2 epochs, no peers (a test)

Variants: ``default`` (the trainer's defaults), ``<name>_warm`` (a second run on the same data
set: latent, compile and CUDA driver caches warm; every other variant starts with all three
empty, as on a new machine), ``compile`` (compile=on),
``flash`` (attention=flash), ``fp16`` (mixed_precision=fp16, what a T4/V100/20xx card
gets), ``lowmem`` (--low-memory), ``unet`` (compile_scope=unet: the whole UNet per shape),
``nocompile``, ``nographs``, ``nosamples`` (``--set samples=off``: ``default`` minus
``nosamples`` is what the default samples while training cost; each row's ``samples_s`` is
their time inside the run); parts join with ``+`` for overrides of several switches
(``nocompile+fp16``, ``fp16+nosamples``); ``--variants ""`` runs the peers alone. Writes
``$OUT/bench_e2e_<shapes>.json`` when ``OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import kohya  # noqa: E402  (the repository root is on the path only now)
from lora.datapaths import SPLIT_FILE, DatasetPaths  # noqa: E402

#: Danbooru-like sizes (width, height), mostly portrait, repeated in these proportions.
DANBOORU_SIZES = [(512, 768)] * 4 + [(576, 704)] * 2 + [(448, 768)] * 2 + [
    (768, 512), (704, 576), (512, 512), (640, 640)]
#: A wider spread: panoramas, tall strips and squares give 11 bucket shapes at 512 px (9 without
#: the 1024x256 strips, the list the eighth session measured).
MANY_SIZES = DANBOORU_SIZES + [(384, 896), (896, 384), (832, 448), (448, 832), (960, 320), (320, 960),
                               (640, 512), (512, 640), (1024, 256), (256, 1024)]
#: One bucket shape: what one shape's compile costs, cold and from the workspace's cache, in a
#: call's ten minutes (the guide's 5 shapes compile for ~11 minutes cold)
SQUARE_SIZES = [(512, 512)]
SHAPES = {"danbooru": DANBOORU_SIZES, "many": MANY_SIZES, "square": SQUARE_SIZES}

#: variant part -> `animelora train` arguments
PARTS: dict[str, list[str]] = {
    "default": [],
    "fp16": ["--set", "mixed_precision=fp16"],
    "lowmem": ["--low-memory"],
    "unet": ["--set", "compile_scope=unet"],
    "nocompile": ["--set", "compile=off"],
    # torch.compile of the whole UNet per bucket shape whatever the step count; ``compile_warm``
    # compiles again from the workspace's compile cache
    "compile": ["--set", "compile=on"],
    # flash attention: no run-time kernel compile per attention shape (cuDNN's), slower steps
    # at SD1.5's head size 40
    "flash": ["--set", "attention=flash"],
    "nohalfnorms": ["--set", "half_norms=off"],
    "nographs": ["--set", "cuda_graphs=off"],
    "graphs": ["--set", "cuda_graphs=on"],
    # no samples while training: ``default`` against ``nosamples`` is what the default sets cost
    "nosamples": ["--set", "samples=off"],
    # cuDNN's heuristics instead of its benchmark: a first eager call per bucket shape without
    # timing every convolution algorithm, against what the benchmark's choice gains per step
    "nocudnnbench": ["--set", "cudnn_benchmark=off"],
}

#: variant part -> environment of the `animelora train` process (parts that are no setting)
ENV_PARTS: dict[str, dict[str, str]] = {
    # the allocator grows segments instead of caching fixed blocks: whether the memory a run
    # holds above what it uses is fragmentation (the eager validation calls on 5 shapes)
    "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
}

_TQDM_STEPS = re.compile(r"(\d+)/(\d+) \[")


def variant_args(name: str) -> list[str]:
    args: list[str] = []
    for part in name.removesuffix("_warm").split("+"):
        if part not in PARTS and part not in ENV_PARTS:
            raise SystemExit(f"unknown variant part {part!r} in {name!r} (known: {', '.join([*PARTS, *ENV_PARTS])})")
        args += PARTS.get(part, [])
    return args


def variant_env(name: str) -> dict[str, str]:
    """The environment a variant's parts set (:data:`ENV_PARTS`)."""
    env: dict[str, str] = {}
    for part in name.removesuffix("_warm").split("+"):
        env.update(ENV_PARTS.get(part, {}))
    return env


class GpuMemoryWatch:
    """Peak used memory of the card (nvidia-smi, every 0.5 s) while a command runs."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = shutil.which("nvidia-smi") is not None

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max([self.peak_mib] + [float(x) for x in out.split() if x.strip()])
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> "GpuMemoryWatch":
        if self.available:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        return round(self.peak_mib / 1024, 2) if self.available else None


def keep_output(name: str, text: str, lines: int = 80) -> None:
    """The last lines a command printed, into ``$OUT/bench_e2e_output.log`` (why a row failed)."""
    if not os.environ.get("OUT"):
        return
    with open(Path(os.environ["OUT"]) / "bench_e2e_output.log", "a", encoding="utf-8") as f:
        f.write(f"===== {name}\n" + "\n".join(text.splitlines()[-lines:]) + "\n")


def build_data(work: Path, shapes: str, n: int) -> Path:
    from lora.testing.datasets import write_synthetic_dataset

    data = work / f"data-{shapes}"
    if DatasetPaths(data).versions.is_dir():
        return data
    shutil.rmtree(data, ignore_errors=True)
    # a fixed salt: every machine holds out the same images (a new data set draws a random one,
    # which gave 2,940 steps on one machine and 2,960 on another for the same command)
    data.mkdir(parents=True)
    (data / SPLIT_FILE).write_text(json.dumps({"salt": "animelora-bench", "fraction": 0.1}) + "\n")
    return write_synthetic_dataset(data, n, SHAPES[shapes], first_id=1000, compress_level=0,
                                   caption=lambda i: f"1girl, solo, tag{i % 7}, color{i % 5}")


def bench_images(data: Path) -> list[Path]:
    """The data set's images (each with its .txt caption beside it): what every peer trains on."""
    return sorted(DatasetPaths(data).images.glob("*.png"))


def peer_folder(data: Path, work: Path) -> Path:
    """The same images as an `imagefolder` data set (hard links + metadata.jsonl) for the script."""
    folder = work / f"peer-{data.name}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for img in bench_images(data):
        kohya.link_or_copy(img, folder / img.name)
        rows.append(json.dumps({"file_name": img.name, "text": img.with_suffix(".txt").read_text()}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def progress_step(text: str, marker: str) -> int | None:
    """The step count on one line of a peer's progress bar named ``marker`` (``Steps:`` for the
    diffusers script, ``steps:`` for kohya), or None for any other line (logs, the latent
    cache's bar, kohya's ``epoch 1/20``)."""
    if marker not in text:
        return None
    m = _TQDM_STEPS.search(text, text.index(marker))
    return int(m.group(1)) if m else None


def project(marks: list[tuple[float, int]], steps: int, full_steps: int, wall: float,
            batch: int = 4) -> dict[str, Any] | None:
    """A peer's time for ``full_steps`` from a ``steps``-step run: start-up (process start to the
    first step) + ``full_steps`` at the steady rate (from 10% of the steps to the last step
    seen, so the first steps' warm-up is left out) + the time after its last step (saving).
    ``marks`` are (seconds since start, steps done) as read off its progress bar; None when
    they are too few to give a rate."""
    if len(marks) < 3 or not any(n >= 1 for _, n in marks):
        return None
    first_t = next(t for t, n in marks if n >= 1)
    start_t, start_n = next(((t, n) for t, n in marks if n >= max(2, steps // 10)), marks[0])
    end_t, end_n = marks[-1]
    if end_t <= start_t or end_n <= start_n:
        return None
    rate = (end_n - start_n) / (end_t - start_t)
    return dict(first_step_s=round(first_t, 1), img_per_s=round(rate * batch, 2),
                projected_wall_s=round(first_t + full_steps / rate + (wall - end_t), 1),
                note=f"projected: start-up {first_t:.0f} s + {full_steps} steps at {rate:.2f} steps/s "
                     f"(measured over {end_n - start_n} steps of a {steps}-step run)")


def time_peer(label: str, cmd: list[str], marker: str, env: dict[str, str], cwd: Path, steps: int,
              full_steps: int) -> dict[str, Any]:
    """Run a peer's training command for ``steps`` steps, reading its progress bar as it goes
    (the time of each step count it shows), and project its time for ``full_steps``."""
    marks: list[tuple[float, int]] = []
    t0 = time.monotonic()
    tail: list[str] = []
    # every other line with the second it came at: where a peer's start-up went
    timed: list[str] = []
    with GpuMemoryWatch() as watch:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            buf += chunk
            *pieces, buf = re.split(rb"[\r\n]", buf)
            now = time.monotonic() - t0
            for piece in pieces:
                text = piece.decode("utf-8", "replace")
                n = progress_step(text, marker)
                if n is not None:
                    if not marks or n > marks[-1][1]:
                        marks.append((now, n))
                elif text.strip():
                    tail = (tail + [text])[-15:]
                    timed = (timed + [f"{now:7.1f} s  {text}"])[-400:]
        rc = proc.wait()
    wall = time.monotonic() - t0
    keep_output(label, "\n".join(timed), lines=400)
    row: dict[str, Any] = {"variant": label, "rc": rc, "steps_run": marks[-1][1] if marks else 0,
                           "wall_run_s": round(wall, 1), "smi_gib": watch.peak_gib}
    projected = project(marks, steps, full_steps, wall) if rc == 0 else None
    if projected is None:
        row["error"] = " | ".join(tail)[-1500:]
        return row
    row.update(projected)
    return row


def run_peer(script: Path, model: Path, data: Path, work: Path, steps: int, full_steps: int) -> dict[str, Any]:
    """The diffusers script for ``steps`` steps; its time for ``full_steps`` projected."""
    out_dir = work / "peer-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "fp16", "--dynamo_backend", "no", str(script.resolve()),
           "--pretrained_model_name_or_path", str(model.resolve()), "--train_data_dir", str(peer_folder(data, work).resolve()),
           "--caption_column", "text", "--resolution", "512", "--center_crop", "--random_flip",
           "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "5e-5",
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "16", "--mixed_precision", "fp16",
           "--dataloader_num_workers", "8", "--output_dir", str(out_dir), "--seed", "0",
           "--checkpointing_steps", "1000000", "--report_to", "tensorboard"]
    return time_peer("diffusers script (fp16)", cmd, "Steps:",
                     {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, work, steps, full_steps)


def run_kohya(scripts: Path, site: Path | None, model: Path, data: Path, work: Path, steps: int,
              full_steps: int) -> dict[str, Any]:
    """kohya's train_network.py (its files in ``scripts``, its pinned packages in ``site``) for
    ``steps`` steps on the same images and model weights; its time for ``full_steps`` projected."""
    out_dir = work / "kohya-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = kohya.command(sys.executable, scripts.resolve(), kohya.model_view(model.resolve(), work),
                        kohya.data_layout(bench_images(data), work), out_dir,
                        kohya.tokenizer_cache(model.resolve(), work), steps)
    return time_peer("kohya train_network (fp16)", cmd, kohya.PROGRESS_MARKER,
                     kohya.environment(site, os.environ), work, steps, full_steps)


def variant_cache(work: Path, name: str) -> Path:
    """The caches' folder (``ANIMELORA_CACHE``) of a variant: ``<name>_warm`` shares ``<name>``'s."""
    return work / f"cache-{name.removesuffix('_warm')}"


def run_ours(name: str, model: Path, data: Path, work: Path, epochs: int, extra: list[str]) -> dict[str, Any]:
    if "@" in name:  # "<variant>@<epochs>": a shorter run of one variant
        name, _, count = name.partition("@")
        epochs = int(count)
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    # each variant starts with empty caches, as on a new machine (latent cache, compiled kernels,
    # the CUDA driver's run-time kernels: the trainer keeps all three under ANIMELORA_CACHE);
    # ``<name>_warm`` reuses ``<name>``'s
    caches = variant_cache(work, name)
    if not name.endswith("_warm"):
        shutil.rmtree(caches, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANIMELORA_CACHE": str(caches), **variant_env(name)}
    for chosen in ("CUDA_CACHE_PATH", "TORCHINDUCTOR_CACHE_DIR"):  # the trainer's choice, not the caller's
        env.pop(chosen, None)
    cmd = [sys.executable, "-m", "animelora", "train", "--dataset", str(data), "--run-dir", str(run_dir),
           "--preset", "phase2a", "--model", str(model), "--epochs", str(epochs), "-q",
           "--set", "validation_count=50", "--set", "checkpoint_every_minutes=10", *extra, *variant_args(name)]
    t0 = time.monotonic()
    with GpuMemoryWatch() as watch:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.monotonic() - t0
    keep_output(name, proc.stdout + proc.stderr)
    row: dict[str, Any] = {"variant": name, "epochs": epochs, "rc": proc.returncode, "wall_s": round(wall, 1),
                           "smi_gib": watch.peak_gib}
    try:
        log = json.loads((run_dir / "training_log.json").read_text())
    except (OSError, json.JSONDecodeError):
        row["error"] = (proc.stderr or proc.stdout)[-1500:]
        return row
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout)[-1500:]
    steps = log.get("steps", [])
    seg = (log.get("segments") or [{}])[-1]
    # the segment's clock starts inside the process: add the imports before it
    before = max(0.0, wall - seg.get("wall_s", wall)) if seg.get("wall_s") else 0.0
    first = seg.get("first_step_s")
    rates = [s["images_per_sec"] for s in steps[len(steps) // 10:] if s.get("images_per_sec")]
    steady_images = sum(s.get("images", 0) for s in steps[len(steps) // 10:])
    steady_time = sum(s.get("images", 0) / s["images_per_sec"] for s in steps[len(steps) // 10:]
                      if s.get("images_per_sec"))
    row.update(steps=len(steps), image_steps=sum(s.get("images", 0) for s in steps),
               first_step_s=round(before + first, 1) if first is not None else None,
               setup_s=round(before + seg["setup_s"], 1) if seg.get("setup_s") is not None else None,
               warmup_s=round(first - seg["setup_s"], 1) if first is not None and seg.get("setup_s") else None,
               img_per_s=round(steady_images / steady_time, 2) if steady_time else None,
               median_img_per_s=sorted(rates)[len(rates) // 2] if rates else None,
               reserved_gib=seg.get("gpu_max_reserved_gib"), allocated_gib=seg.get("gpu_max_allocated_gib"),
               setup_reserved_gib=seg.get("setup_max_reserved_gib"), graph_shapes=seg.get("graph_shapes"),
               graph_warmup_s=seg.get("graph_warmup_s"), fast_path=seg.get("fast_path"),
               # the set-up's parts and each shape's warm-up (setup_table)
               before_segment_s=round(before, 1), setup_parts=seg.get("setup_parts"),
               graph_warmups=seg.get("graph_warmups"),
               # where the rest of the wall time went: every step's own time, then between steps
               steps_s=round(sum(s["images"] / s["images_per_sec"] for s in steps[1:]
                                 if s.get("images_per_sec")), 1),
               validation_s=seg.get("validation_s"), validations=seg.get("validation_count"),
               validation_each_s=seg.get("validation_each_s"),
               samples_s=seg.get("samples_s"), sample_sets=seg.get("samples_count"),
               checkpoint_s=seg.get("checkpoint_s"), export_s=seg.get("export_s"),
               final_val=(log.get("validation") or [{}])[-1].get("loss"),
               # the largest figure after each kind of work (memory_table)
               reserved_after_gib={kind: max(each) for kind, each in (seg.get("reserved_after_each_gib") or {}).items()
                                   if each})
    return row


def project_full(row: dict[str, Any], full_steps: int, full_epochs: int, sets: int = 4) -> float | None:
    """A shorter row's wall time projected to the whole run, as a peer's is: its wall time plus
    the steps it did not run at its own time per step, one validation for each epoch end it did
    not reach at its median later validation, and the sample sets it did not draw at its mean
    set time (the default draws one at step 0 and ``sets`` spread over the epochs, so a run of
    ``sets`` epochs or more draws them all). Why: a GPU call of a few minutes runs a few epochs
    of each variant, and their whole-run figures should still compare with the peers'. None for
    a whole run, a failed row or one without these figures."""
    steps, wall, steps_s = row.get("steps") or 0, row.get("wall_s"), row.get("steps_s")
    if row.get("error") or steps < 2 or steps >= full_steps or not wall or not steps_s:
        return None
    later = sorted((row.get("validation_each_s") or [])[1:])
    validation_each = later[len(later) // 2] if later else 0.0
    missing_validations = max(0, full_epochs + 1 - (row.get("validations") or 0)) if later else 0
    drawn = row.get("sample_sets") or 0
    missing_sets = max(0, min(full_epochs, sets) + 1 - drawn) if drawn else 0
    set_each = (row.get("samples_s") or 0.0) / drawn if drawn else 0.0
    return round(wall + (full_steps - steps) * steps_s / (steps - 1) + missing_validations * validation_each
                 + missing_sets * set_each, 1)


def table(rows: list[dict[str, Any]], peers: dict[str, dict[str, Any] | None], full_steps: int,
          full_epochs: int | None = None) -> str:
    """Our rows and the peers' (``{"script": row, "kohya": row}``; a peer not run is None), with
    each row's speed-up over each peer that ran: the peer's (projected) wall time over the row's.
    A peer's row compares with the other peer too (kohya's ``x script``). With ``full_epochs``,
    a row of fewer epochs is projected to the whole run (:func:`project_full`; said in its wall
    cell) and compared by that; without, it is not compared."""
    ran = {name: row for name, row in peers.items() if row is not None}
    refs = {name: row.get("projected_wall_s") for name, row in ran.items()}
    head = ("| variant | epochs | wall s | 1st step s | warm-up s | steps s | steps % | validation s | samples s | "
            "images/s | reserved GiB | smi GiB |")
    lines = [head + "".join(f" x {name} |" for name in ran),
             "| --- " * (12 + len(ran)) + "|"]

    def speedups(wall: float | None) -> str:
        return "".join(f" {refs[name] / wall:.2f} |" if refs[name] and wall else " - |" for name in ran)

    for row in ran.values():
        wall = row.get("projected_wall_s")
        lines.append(f"| {row['variant']} | - | {wall or '-'} (projected; ran {row.get('steps_run')} steps in "
                     f"{row.get('wall_run_s')}) | {row.get('first_step_s', '-')} | - | - | - | - | - | "
                     f"{row.get('img_per_s', '-')} | - | {row.get('smi_gib', '-')} |" + speedups(wall))
    for r in rows:
        # the peers' projections are for the full run: compare runs of that length, or a shorter
        # row's own projection to it
        wall = r.get("wall_s") if not r.get("error") and r.get("steps") == full_steps else None
        shown = r.get("wall_s")
        if wall is None and full_epochs:
            wall = project_full(r, full_steps, full_epochs)
            if wall is not None:
                shown = f"{r.get('wall_s')} (~{wall} for {full_epochs} epochs, projected)"
        share = f"{100 * r['steps_s'] / r['wall_s']:.0f}" if r.get("steps_s") and r.get("wall_s") else "-"
        lines.append(f"| {r['variant']} | {r.get('epochs')} | {shown} | {r.get('first_step_s')} | {r.get('warmup_s')} | "
                     f"{r.get('steps_s')} | {share} | {r.get('validation_s')} | {r.get('samples_s') or '-'} | "
                     f"{r.get('img_per_s')} | {r.get('reserved_gib')} | {r.get('smi_gib')} |" + speedups(wall))
    return "\n".join(lines)


def setup_table(rows: list[dict[str, Any]]) -> str:
    """Where each row's time before its first step went: the process start and imports
    (before the segment's clock), each part of the set-up, and each shape's warm-up (its first
    eager call, its second, its capture)."""
    parts: list[str] = []
    for r in rows:
        parts += [p for p in (r.get("setup_parts") or {}) if p not in parts]
    lines = ["| variant | imports s | " + " | ".join(f"{p} s" for p in parts)
             + " | warm-up per shape: 1st call / 2nd / capture s | validation at step 0 s | later validations, median s |",
             "| --- " * (5 + len(parts)) + "|"]
    for r in rows:
        got = r.get("setup_parts") or {}
        shapes = "; ".join(f"{'x'.join(map(str, w['shape']))}: " + " / ".join(str(v) for v in [*w.get("eager_s", []), w.get("capture_s")])
                           for w in r.get("graph_warmups") or [])
        each = r.get("validation_each_s") or []
        later = sorted(each[1:])
        lines.append(f"| {r['variant']} | {r.get('before_segment_s')} | " + " | ".join(str(got.get(p, '-')) for p in parts)
                     + f" | {shapes or '-'} | {each[0] if each else '-'} | {later[len(later) // 2] if later else '-'} |")
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str:
    """What each row's allocator held right after each kind of work (the largest figure), beside
    the set-up's peak and the run's: which work grew the memory a run holds. Empty on a CPU."""
    kinds: list[str] = []
    for r in rows:
        kinds += [k for k in (r.get("reserved_after_gib") or {}) if k not in kinds]
    if not kinds:
        return ""
    lines = ["| variant | set-up peak GiB | " + " | ".join(f"after {k} GiB" for k in kinds)
             + " | run's peak GiB | run's peak in use GiB |",
             "| --- " * (4 + len(kinds)) + "|"]
    for r in rows:
        got = r.get("reserved_after_gib") or {}
        lines.append(f"| {r['variant']} | {r.get('setup_reserved_gib', '-')} | "
                     + " | ".join(str(got.get(k, '-')) for k in kinds)
                     + f" | {r.get('reserved_gib', '-')} | {r.get('allocated_gib', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-script", default=None, help="path to diffusers' train_text_to_image_lora.py")
    ap.add_argument("--peer-first", action="store_true", help="run the peers before our variants")
    ap.add_argument("--kohya", default=None, metavar="DIR",
                    help="folder with kohya sd-scripts' train_network.py (bench/peers/README.md): a second peer")
    ap.add_argument("--kohya-site", default=None, metavar="DIR",
                    help="kohya's pinned packages (pip install --target DIR), first on its PYTHONPATH; ours stay off it")
    ap.add_argument("--peer-steps", type=int, default=600, help="steps each peer runs (projection base)")
    ap.add_argument("--shapes", default="danbooru", choices=sorted(SHAPES))
    ap.add_argument("--images", type=int, default=650, help="training + validation images")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", default="default,default_warm,fp16,lowmem")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, 24 images, 2 epochs, no peers")
    a = ap.parse_args(argv)
    # checked before the minutes of set-up, not after them
    for flag, value, inside in (("--peer-script", a.peer_script, ""), ("--kohya", a.kohya, "train_network.py"),
                                ("--kohya-site", a.kohya_site, "")):
        if value and not (Path(value) / inside).exists():
            print(f"{flag} {value}: {f'no {inside} in it' if inside else 'no such path'} "
                  "(bench/peers/README.md says how to get it)", file=sys.stderr)
            return 2

    from bench.train import build_random_sd15

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        model = work / "model"
        if not (model / "unet").is_dir():
            build_random_sd15(model, a.smoke)
        images = 24 if a.smoke else a.images
        data = build_data(work, a.shapes, images)
        # the smoke's model is the tiny one copied to a folder: its sets take 2 denoising steps,
        # not a real model's 20 (a variant's own --set samples=off comes after these and wins)
        extra = ["--resolution", "64", "--set", "validation_count=4",
                 "--set", 'samples={"steps": 2}'] if a.smoke else []
        epochs = 2 if a.smoke else a.epochs
        print(f"set-up (model, {images} images, {a.shapes} sizes): {time.monotonic() - t:.1f} s", flush=True)
        from lora.config import resolve_config
        from lora.train import make_plan

        plan = make_plan(resolve_config("phase2a", {"model": str(model), "dataset": str(data), "epochs": epochs,
                                                    "validation_count": 4 if a.smoke else 50,
                                                    **({"resolution": 64} if a.smoke else {})}))
        buckets = sorted({tuple(b) for b in plan.train_buckets})
        print(f"{len(plan.train_items)} training images in {len(buckets)} buckets {buckets}; "
              f"{plan.total_steps} steps", flush=True)
        peers: dict[str, dict[str, Any] | None] = {"script": None, "kohya": None}
        rows: list[dict[str, Any]] = []

        def report(row: dict[str, Any]) -> None:
            """One finished row: printed, and the JSON so far rewritten (a call cut short by its
            time limit keeps the rows it finished)."""
            print(json.dumps(row), flush=True)
            if os.environ.get("OUT"):
                result = {"shapes": a.shapes, "buckets": [list(b) for b in buckets], "total_steps": plan.total_steps,
                          "train_images": len(plan.train_items), "peer": peers["script"], "kohya": peers["kohya"],
                          "rows": rows}
                Path(os.environ["OUT"], f"bench_e2e_{a.shapes}.json").write_text(json.dumps(result, indent=1))

        def run_peers() -> None:
            if a.smoke:
                return
            if a.peer_script:
                peers["script"] = run_peer(Path(a.peer_script), model, data, work, a.peer_steps, plan.total_steps)
                report(peers["script"])
            if a.kohya:
                peers["kohya"] = run_kohya(Path(a.kohya), Path(a.kohya_site) if a.kohya_site else None, model, data,
                                           work, a.peer_steps, plan.total_steps)
                report(peers["kohya"])

        if a.peer_first:
            run_peers()
        for name in [v for v in a.variants.split(",") if v]:
            base = name.partition("@")[0]
            if base.endswith("_warm") and not (work / f"run-{base.removesuffix('_warm')}").is_dir():
                print(f"{name}: runs after {name.removesuffix('_warm')} (its caches), skipped", flush=True)
                continue
            rows.append(run_ours(name, model, data, work, epochs, extra))
            rows[-1]["projected_full_wall_s"] = project_full(rows[-1], plan.total_steps, epochs)
            report(rows[-1])
        # by default after ours: a run cut short by a time limit loses the peers' rows first
        if not a.peer_first:
            run_peers()
        print(f"\n{a.shapes}: {len(plan.train_items)} training images, {len(buckets)} buckets, "
              f"{plan.total_steps} steps ({epochs} epochs)")
        print(table(rows, peers, plan.total_steps, epochs))
        print("\nbefore the first step:\n" + setup_table(rows))
        memory = memory_table(rows)
        if memory:
            print("\nmemory held (torch's allocator, reserved):\n" + memory)
        return 1 if any(r.get("error") for r in [*rows, *filter(None, peers.values())]) else 0


if __name__ == "__main__":
    sys.exit(main())
