"""`animelora analyze`, `animelora sample` and `animelora publish`.

Heavy imports (matplotlib, torch, diffusers, huggingface_hub) happen inside the handlers so
that building the CLI stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora.runpaths import LOG_FILE, SAMPLES_GRID, SAMPLES_JSON, RunPaths

from .paths import add_path

if TYPE_CHECKING:
    from lora.sample import SampleRequest


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


# -- analyze -------------------------------------------------------------------------------
def _analyze(args: argparse.Namespace) -> int:
    from lora.analysis import (
        LogError,
        analyze_log,
        compare_runs,
        json_safe,
        plot_comparison,
        plot_loss,
        table_text,
    )

    if not (args.spike_threshold > 0):
        return _fail(f"--spike-threshold must be a positive percentage, got {args.spike_threshold}",
                     2)
    if args.rescore:
        return _rescore(args)
    missing = [item for item in args.logs if not Path(item).exists()]
    if missing:  # a path on the command line that is not there: a usage error
        return _fail(f"{missing[0]}: no such file or run folder", 2)
    analyses = []
    for item in args.logs:
        try:
            analyses.append(analyze_log(Path(item), spike_threshold_pct=args.spike_threshold))
        except LogError as exc:
            return _fail(str(exc))
    comparison = compare_runs(analyses)
    if args.plot:
        try:
            if len(analyses) == 1:
                plot_loss(analyses[0], args.plot)
            else:
                plot_comparison(analyses, args.plot)
        except OSError as exc:
            return _fail(f"{args.plot}: cannot write the plot ({exc.strerror or exc})")
    if args.json:
        print(json.dumps(json_safe([a.to_dict() for a in analyses]), indent=2))
        return 0
    print(table_text(comparison.rows))
    print()
    for analysis in analyses:
        print(f"{analysis.name}: {analysis.verdict}")
    lines = comparison.pair_lines()
    if lines:
        print("\npaired on shared held-out images (difference = first minus second; below 0: "
              "the first has the lower loss):")
        for line in lines:
            print(f"  {line}")
    if len(analyses) > 1:
        print(f"\nbest: {comparison.best or '-'} ({comparison.note})")
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def _rescore(args: argparse.Namespace) -> int:
    """Score every run's exported LoRA and the base model on one common held-out set."""
    from lora.analysis.paired import paired_compare, pick_best
    from lora.analysis.rescore import RescoreError, rescore_runs

    try:
        result = rescore_runs([Path(p) for p in args.logs], device=args.device)
    except RescoreError as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - model loading errors come as one line too
        if type(exc).__name__ == "ModelLoadError":
            return _fail(str(exc))
        raise
    runs = list(result.runs)
    pairs = [paired_compare(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    vs_base = [paired_compare(run, result.base) for run in runs]
    if args.json:
        print(json.dumps({"images": list(result.images), "vs_base_model": [p.to_dict() for p in vs_base],
                          "pairs": [p.to_dict() for p in pairs]}, indent=2))
        return 0
    print(f"re-scored on {len(result.images)} held-out images that no compared run trained on "
          "(fixed timesteps and noise); difference = first minus second, below 0: the first has "
          "the lower loss")
    for line in [p.sentence() for p in vs_base + pairs]:
        print(f"  {line}")
    if len(runs) > 1:
        best = pick_best([r.label for r in runs], pairs)
        print(f"\nbest: {best or '-'} ("
              + ("lower than every other run, 95% interval below 0)" if best else "not distinguishable)"))
    return 0


# -- sample --------------------------------------------------------------------------------
def _config_model(run: Path) -> str | None:
    """The base model a run was trained on, from config.json (or the training log)."""
    paths = RunPaths(run)
    for data in (paths.read_config(), paths.read_log()):
        if isinstance(data, dict):
            nested = data.get("config") if isinstance(data.get("config"), dict) else {}
            model = data.get("model") or nested.get("model") or data.get("base_model")
            if isinstance(model, str) and model:
                return model
    return None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}")
    if not seeds:
        raise argparse.ArgumentTypeError("at least one seed is needed")
    return seeds


def _sample_request(args: argparse.Namespace) -> "SampleRequest":
    """What ``animelora sample`` renders (a :class:`lora.sample.SampleRequest`) from its flags."""
    from lora.sample import DEFAULT_NEGATIVE_PROMPT, SampleRequest, read_prompts

    return SampleRequest(
        prompts=read_prompts(args.prompts) if args.prompts else None,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt,
        seeds=args.seeds, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
        lora_scale=args.lora_scale, resolution=args.resolution, lcm_lora=args.lcm_lora,
        trigger_word=getattr(args, "trigger_word", None) or None)


def _sample(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        return _fail(f"{run}: run folder not found", 2)
    for other in args.compare:
        if not Path(other).is_dir():
            return _fail(f"{other}: run folder not found (--compare)", 2)
    model = args.model or _config_model(run)
    if not model:
        return _fail(f"{run}: no base model in config.json; pass --model tiny|HUB_ID|PATH", 2)

    from lora.sample import SampleError, SampleUsageError, generate_samples

    try:
        request = _sample_request(args)
    except SampleError as exc:
        return _fail(str(exc), 2)
    out = Path(args.out) if args.out else RunPaths(run).samples
    try:
        result = generate_samples(model, [run, *map(Path, args.compare)], out, request, device=args.device)
    except SampleUsageError as exc:  # --out, --device, --steps, --resolution: nothing was written
        return _fail(str(exc), 2)
    except SampleError as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - model loading and I/O errors come as one line too
        if getattr(args, "verbose", False):
            raise
        if type(exc).__name__ == "ModelLoadError":
            return _fail(str(exc))
        return _fail(f"sampling failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    print(f"{len(result.images)} images in {result.out_dir}")
    print(f"grid: {result.grid_path}")
    print(f"settings: {result.json_path}")
    return 0


# -- publish -------------------------------------------------------------------------------
def _publish(args: argparse.Namespace) -> int:
    from lora.hub import PublishArgumentError, PublishError, publish

    run = Path(args.run)
    if not run.is_dir():
        return _fail(f"{run}: run folder not found", 2)
    try:
        if not run.is_dir():
            raise PublishArgumentError(f"--run {run}: run folder not found")
        result = publish(run, args.repo_id, private=args.private, endpoint=args.endpoint,
                         dry_run=args.dry_run, trigger_word=args.trigger_word,
                         license=args.license, base_model=args.base_model,
                         allow_test_model=args.allow_test_model, card=args.card)
    except PublishArgumentError as exc:
        return _fail(str(exc), 2)
    except PublishError as exc:
        return _fail(str(exc))
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.describe())
    if not args.dry_run:
        print(f"published: {result.url}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="loss metrics, verdict and comparison of training logs",
        description="Initial/min/final loss, improvement %, spikes, a smoothed trend and a "
                    f"verdict for each {LOG_FILE} (or run folder), and a comparison.")
    add_path(p, "logs", role="input", nargs="+", metavar="LOG_OR_RUN",
                   help=f"a {LOG_FILE} or a run folder")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    p.add_argument("--spike-threshold", type=float, default=30.0, metavar="PCT",
                   help="epoch-to-epoch jump that counts as a spike (default 30%%)")
    add_path(p, "--plot", role="output_png", metavar="OUT.png",
                   help="write a loss-curve PNG (a comparison plot for several runs)")
    p.add_argument("--rescore", action="store_true",
                   help="re-score each run folder's exported LoRA (and the base model) on the "
                        "held-out images no compared run trained on, with fixed noise: compares "
                        "old runs and runs on different data-set versions fairly")
    p.add_argument("--device", default="auto", help="device for --rescore: auto, cpu, cuda ...")
    p.set_defaults(func=_analyze)

    p = sub.add_parser(
        "sample", help="base model vs LoRA images at fixed prompts and seeds",
        description="Render the base model and the run's LoRA (and other runs' LoRAs) at the "
                    f"same prompts and seeds; writes images, {SAMPLES_GRID} and {SAMPLES_JSON}.")
    add_path(p, "--run", role="existing_run", required=True, help="the run folder (holds lora/)")
    add_path(p, "--compare", role="existing_run", action="append", default=[], metavar="RUN",
                   help="another run folder to add as a column (repeatable)")
    add_path(p, "--model", role="input", help="base model: tiny, a Hub id or a path "
                                   "(default: the run's config.json 'model')")
    add_path(p, "--prompts", role="input", metavar="FILE",
                   help="prompts file: one per line (# comments) or a JSON list")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt for every image (default: lowres, bad anatomy, ...)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1], help="comma-separated (default 0,1)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default 20; 4 for tiny or LCM)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7; 1 for LCM)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="LoRA strength (default 1.0; 0.8 is what the model card suggests)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size, a multiple of 8 (default 512; the tiny model's own size for tiny)")
    p.add_argument("--scheduler", default="euler_a",
                   choices=("euler_a", "dpm++", "euler", "ddim"),
                   help="sampler (default euler_a, as in AUTOMATIC1111's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    add_path(p, "--lcm-lora", role="input", metavar="PATH",
                   help="local LCM-LoRA weights for fast few-step sampling")
    add_path(p, "--out", role="output_dir", help="output folder (default RUN/samples): new, empty, or an earlier "
                                 "samples folder, which is replaced; any other folder or a file is refused")
    p.add_argument("--trigger-word",
                   help="put first in each default prompt (default: the trigger word recorded "
                        "in the run's kohya file); --prompts are used as written")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "publish", help="stage hub/ and upload the LoRA to the Hugging Face Hub",
        description="Stage RUN/hub/ from an allow-list (both LoRA files, the model card, the "
                    "sample images, metrics and the loss plot) and upload it. Unless --private, "
                    "the repo and everything in it is public. Checkpoints, caches, config.json "
                    "and the data set never leave the machine. The token comes from HF_TOKEN.")
    add_path(p, "--run", role="existing_run", required=True, help="the run folder")
    add_path(p, "--repo-id", role="repo_id", required=True, metavar="USER/NAME",
                   help="the Hub model repo to create or update, e.g. you/anime-lora")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (default: public, visible to everyone)")
    p.add_argument("--dry-run", action="store_true",
                   help="stage only and print what would be sent; nothing leaves the machine")
    p.add_argument("--endpoint", help="Hub endpoint URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--trigger-word",
                   help="trigger word shown in the card (default: the one recorded in the "
                        "kohya file, i.e. the first tag of every caption)")
    p.add_argument("--base-model", metavar="HUB_ID_OR_NAME",
                   help="the base model to name in the card: a Hub id (owner/name, set as the "
                        "card's base_model) or the name of a local checkpoint (named in the text "
                        "only); default: the model the run was trained on")
    p.add_argument("--license", default=None,
                   help="a Hub license identifier such as creativeml-openrail-m (default), "
                        "openrail++, cc-by-nc-4.0, mit or other; checked before staging")
    add_path(p, "--card", role="input", metavar="FILE",
             help="your own model card (markdown) to upload as the repo's README instead of the "
                  "generated one; publish never replaces a card you edited inside RUN/hub/")
    p.add_argument("--allow-test-model", action="store_true",
                   help="upload a run trained on the tiny test model (--model tiny) anyway; "
                        "refused otherwise, as such a LoRA is of no use")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (repo, visibility, url, files) instead of text")
    p.set_defaults(func=_publish)
