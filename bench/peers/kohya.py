"""kohya sd-scripts' `train_network.py` as a peer of bench/e2e.py: its files, data layout and command.

Why apart from e2e.py: kohya is not part of this repository and pins its own dependencies
(accelerate 1.6, transformers 4.54, diffusers 0.32, huggingface-hub 0.34) that cannot share a
site-packages with ours (diffusers >= 0.31 at its newest). So the peer runs from a folder of
kohya's own files (exported here from a git checkout, never copied into tracked files) with
its pinned wheels on a PYTHONPATH of their own, shadowing the machine's newer packages. This
module only prepares paths and argument lists; bench/e2e.py times the process with the same
code that times the diffusers script.

    python bench/peers/kohya.py export --git-dir PATH/sd-scripts[/.git] --dest .peers/sd-scripts

exports train_network.py, networks/lora.py and every library/ module their import statements
reach (module-level and deferred ones alike, so no code path of an SD1.5 LoRA run finds a file
missing), from ``--rev`` (HEAD). bench/peers/README.md says how the files and wheels travel.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

#: the files a SD1.5 LoRA run starts from: the script, and the network module it imports by name
ENTRY_FILES = ("train_network.py", "networks/lora.py")
#: the folders whose modules count as kohya's own (everything else is a package)
LOCAL_PACKAGES = ("library", "networks")
#: kept beside the code: its licence
EXTRA_FILES = ("LICENSE.md",)
#: the id kohya's SD1.5 tokenizer strategy loads (library/strategy_sd.py); with
#: --tokenizer_cache_dir it reads ``<dir>/<id with / as _>`` instead of the Hub
TOKENIZER_ID = "openai/clip-vit-large-patch14"
#: kohya's progress bar: ``steps:  10%|#    | 60/600 [00:31<04:41, ...]`` (the latent cache's bar has no name)
PROGRESS_MARKER = "steps:"
#: the sub-folders a diffusers StableDiffusionPipeline folder holds (kohya loads it whole)
_PIPELINE_PARTS = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                   "text_encoder": ("transformers", "CLIPTextModel"), "scheduler": ("diffusers", "DDPMScheduler")}


def _module_file(name: str, exists: Callable[[str], bool]) -> str | None:
    """The kohya file that defines module ``name`` (``library.train_util`` -> library/train_util.py)."""
    if name.split(".")[0] not in LOCAL_PACKAGES:
        return None
    base = name.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if exists(candidate):
            return candidate
    return None


def _imported_names(path: str, source: str) -> set[str]:
    """Every module name an import statement anywhere in ``source`` may load (``from a import b``
    gives ``a`` and ``a.b``: b may be a sub-module)."""
    names: set[str] = set()
    package = path.rsplit("/", 1)[0].replace("/", ".") if "/" in path else ""
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package up
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_closure(read: Callable[[str], str | None], entries: Iterable[str] = ENTRY_FILES) -> list[str]:
    """The kohya files ``entries`` need: themselves, every local module they import, transitively,
    and the ``__init__.py`` of each package on the way. ``read(path)`` gives a file's text or None."""
    cache: dict[str, str | None] = {}

    def text(path: str) -> str | None:
        if path not in cache:
            cache[path] = read(path)
        return cache[path]

    seen: set[str] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        source = text(path)
        if source is None:
            raise FileNotFoundError(f"kohya file {path} not found")
        seen.add(path)
        if "/" in path:  # the package's __init__ runs first
            init = path.rsplit("/", 1)[0] + "/__init__.py"
            if init != path and text(init) is not None:
                todo.append(init)
        for name in _imported_names(path, source):
            found = _module_file(name, lambda p: text(p) is not None)
            if found:
                todo.append(found)
    return sorted(seen)


def git_reader(git_dir: Path, rev: str = "HEAD") -> Callable[[str], str | None]:
    """Read files of ``rev`` straight from a git directory (a bare mirror has no work tree)."""
    listing = subprocess.run(["git", "-C", str(git_dir), "ls-tree", "-r", "--name-only", rev],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    present = set(filter(None, listing))

    def read(path: str) -> str | None:
        if path not in present:
            return None
        return subprocess.run(["git", "-C", str(git_dir), "show", f"{rev}:{path}"], capture_output=True,
                              text=True, check=True).stdout
    return read


def export(git_dir: Path, dest: Path, rev: str = "HEAD") -> list[str]:
    """Write the closure of ENTRY_FILES (and EXTRA_FILES) at ``rev`` into ``dest``, whole or not at all."""
    from lora.fsutil import make_temp_dir, swap_dir

    read = git_reader(git_dir, rev)
    files = import_closure(read) + [f for f in EXTRA_FILES if read(f) is not None]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.")
    try:
        for path in files:
            target = tmp / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(read(path) or "", encoding="utf-8")
        rev_id = subprocess.run(["git", "-C", str(git_dir), "rev-parse", rev], capture_output=True, text=True,
                                check=True).stdout.strip()
        (tmp / "SOURCE").write_text(f"kohya-ss/sd-scripts {rev_id}\n" + "\n".join(files) + "\n")
        swap_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no second copy of 650 images), a copy across file systems."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def data_layout(images: Iterable[Path], work: Path, repeats: int = 1) -> Path:
    """kohya's DreamBooth-style folder: ``<dir>/<repeats>_<name>/`` with each image and its .txt
    caption beside it. Returns ``<dir>`` (its --train_data_dir)."""
    root = work / "kohya-data"
    folder = root / f"{repeats}_bench"
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        link_or_copy(img, folder / img.name)
        link_or_copy(img.with_suffix(".txt"), folder / img.with_suffix(".txt").name)
    return root


def model_view(model: Path, work: Path) -> Path:
    """The bench's model folder as kohya reads it: kohya loads a diffusers folder with
    ``StableDiffusionPipeline.from_pretrained``, which needs ``model_index.json`` (the bench's
    random-weight folder has only the parts). The same weights, linked, plus that index; the
    bench's own folder is left as it is."""
    view = work / "kohya-model"
    view.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.1",
                                "feature_extractor": [None, None], "safety_checker": [None, None],
                                "requires_safety_checker": False, "tokenizer": ["transformers", "CLIPTokenizer"]}
    for part in [*_PIPELINE_PARTS, "tokenizer"]:
        link = view / part
        if not link.exists():
            link.symlink_to((model / part).resolve(), target_is_directory=True)
    index.update({part: list(cls) for part, cls in _PIPELINE_PARTS.items()})
    (view / "model_index.json").write_text(json.dumps(index, indent=1))
    _text_encoder_keys(model / "text_encoder", view / "text_encoder")
    return view


def _text_encoder_keys(src: Path, link: Path) -> None:
    """Put back the ``text_model.`` prefix that transformers 4.x (kohya's pin) looks for and
    transformers 5 (ours) no longer writes: without it 4.x starts the text encoder from fresh
    random weights, with one warning in the log, and the peer would not run on our weights.
    ``link`` (the view's text_encoder) becomes a folder with a renamed copy; a checkpoint
    that already has the prefix (or is sharded) stays linked as it is."""
    from safetensors.torch import load_file, save_file

    weights = src / "model.safetensors"
    if not weights.is_file():
        return
    tensors = load_file(weights)
    if all(key.startswith("text_model.") for key in tensors):
        return
    if link.is_symlink():
        link.unlink()
    link.mkdir(exist_ok=True)
    target = link / "model.safetensors"
    if target.is_file() and target.stat().st_mtime >= weights.stat().st_mtime:
        return  # made from these weights already
    shutil.copy2(src / "config.json", link / "config.json")
    tmp = link / ".model.safetensors.tmp"
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, target)


def tokenizer_cache(model: Path, work: Path) -> Path:
    """A --tokenizer_cache_dir holding the model folder's tokenizer under the id kohya asks for,
    so the run reads no network (the GPU machine has none)."""
    cache = work / "kohya-tokenizer"
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / TOKENIZER_ID.replace("/", "_")
    if not link.exists():
        link.symlink_to((model / "tokenizer").resolve(), target_is_directory=True)
    return cache


def arguments(script_dir: Path, model: Path, data: Path, out_dir: Path, tokenizers: Path, steps: int, *,
              mixed_precision: str = "fp16", resolution: int = 512, batch: int = 4, workers: int = 8,
              seed: int = 0) -> list[str]:
    """`train_network.py` and its arguments: kohya's recommended settings for an SD1.5 LoRA
    (cached latents, SDPA, aspect buckets, fp16), at this benchmark's rank 16 / alpha 64, lr 5e-5,
    batch 4, constant schedule, U-Net only as ours trains. Plain AdamW: AdamW8bit needs
    bitsandbytes, which the GPU machine lacks."""
    return [str(script_dir / "train_network.py"),
            "--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(tokenizers),
            "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", str(resolution), "--enable_bucket", "--cache_latents", "--sdpa",
            "--mixed_precision", mixed_precision, "--save_precision", "fp16",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "64",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "5e-5",
            "--lr_scheduler", "constant", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
            "--max_data_loader_n_workers", str(workers), "--persistent_data_loader_workers",
            "--output_dir", str(out_dir), "--output_name", "kohya", "--save_model_as", "safetensors",
            "--seed", str(seed)]


def command(python: str, script_dir: Path, model: Path, data: Path, out_dir: Path, tokenizers: Path, steps: int,
            *, mixed_precision: str = "fp16", **kwargs: int) -> list[str]:
    """The whole command line as kohya's README gives it: ``accelerate launch
    --num_cpu_threads_per_process 1 train_network.py ...`` (one process; accelerate from the
    peer's own packages, since ``python -m`` finds it on the peer's PYTHONPATH)."""
    return [python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
            *arguments(script_dir, model, data, out_dir, tokenizers, steps, mixed_precision=mixed_precision, **kwargs)]


def environment(site: Path | None, base: Mapping[str, str]) -> dict[str, str]:
    """The peer's environment: its pinned packages first on the path and nothing of ours (our
    PYTHONPATH holds the newer diffusers it must not see); offline, unbuffered."""
    env = {k: v for k, v in base.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the files an SD1.5 LoRA run imports into --dest")
    ex.add_argument("--git-dir", required=True, type=Path, help="a git directory of kohya-ss/sd-scripts")
    ex.add_argument("--dest", required=True, type=Path)
    ex.add_argument("--rev", default="HEAD")
    a = ap.parse_args(argv)
    try:
        files = export(a.git_dir, a.dest, a.rev)
    except (subprocess.CalledProcessError, FileNotFoundError, OSError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else exc
        print(f"export failed: {detail}", file=sys.stderr)
        return 1
    print(f"{len(files)} files -> {a.dest}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
