"""`animelora train`: train or resume a LoRA run in a run folder.

Exit codes: 0 the run is complete (LoRA files written); 3 stopped early and resumable
(time budget or a first Ctrl-C / SIGTERM: the current step is finished and a checkpoint
written — re-run the same command to continue; --stop-at-step N: re-run without it, or with a
later step); 2 bad arguments, config or data set, a --stop-at-step the run has already
reached (re-running could never progress), or a run folder that cannot take this run (a file,
another trainer in it, another run's settings, a finished run without --extend); 1 runtime failure (model cannot load, out of
memory, ...); 130 / 143 a second Ctrl-C / SIGTERM, which stops at once without a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from lora.runpaths import KEPT_LORA_PREFIX, RunPaths

from .paths import add_path

EXIT_COMPLETE = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_STOPPED_EARLY = 3


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (numbers, true, lists), else text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    from lora.config import setting_names

    from .settings import unknown_settings

    problem = unknown_settings(out, setting_names())
    if problem:
        raise ValueError(problem)
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {
        "dataset": str(Path(args.dataset).expanduser().resolve()) if args.dataset else None,
        "model": args.model,
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "seed": args.seed,
        "checkpoint_every_steps": args.checkpoint_every_steps,
        "checkpoint_every_minutes": args.checkpoint_every_minutes,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "run_name": args.run_name,
        "low_memory": True if args.low_memory else None,
        "save_dtype": args.save_dtype,
    }
    values.update(_parse_set(args.set))
    return values


def describe_schedule(cfg: Any, plan: Any, name: str) -> str:
    """The start line: how many steps, and whether --max-steps or the epochs end the run."""
    by_epochs = plan.steps_per_epoch * cfg.epochs
    head = (f"training {name}: {len(plan.train_items)} images ({plan.version}), "
            f"{plan.steps_per_epoch} steps per epoch, ")
    if cfg.max_steps is not None and cfg.max_steps < by_epochs:
        return head + (f"{plan.total_steps} steps: --max-steps {cfg.max_steps} ends the run before "
                       f"{cfg.epochs} epochs ({by_epochs} steps)")
    if cfg.max_steps is not None:
        return head + (f"{plan.total_steps} steps = {cfg.epochs} epochs; --max-steps "
                       f"{cfg.max_steps} is more than that and is not reached (raise --epochs "
                       "to train longer)")
    return head + f"{plan.total_steps} steps = {cfg.epochs} epochs"


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: list[str]) -> None:
    """One JSON object on stdout with --json, else the human lines."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2))
    else:
        for line in human:
            print(line)


def _segment_problem(args: argparse.Namespace) -> str | None:
    """A segment limit that could never let the run progress (a wrapper re-running on exit 3
    would loop forever), named by its flag."""
    if args.time_budget_minutes is not None and not args.time_budget_minutes > 0:
        return f"--time-budget-minutes must be > 0, got {args.time_budget_minutes:g}"
    if args.stop_at_step is not None and args.stop_at_step < 1:
        return f"--stop-at-step must be >= 1, got {args.stop_at_step}"
    return None


def _handler(args: argparse.Namespace) -> int:
    from lora.config import ConfigError, resolve_config

    problem = _segment_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        cfg = resolve_config(args.preset, _overrides(args), Path(args.config) if args.config else None)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    from lora.train import DatasetError, TrainingError, make_plan, train

    from .progress import TrainProgress

    quiet = getattr(args, "quiet", False)
    run_name = cfg.run_name or Path(args.run_dir).name
    budget = args.time_budget_minutes * 60 if args.time_budget_minutes is not None else None
    progress = None if quiet else TrainProgress()
    try:
        # a finished run trains no step (unless --extend): its start line would be untrue
        if not quiet and (args.extend or RunPaths(Path(args.run_dir)).finished_step() is None):
            print(describe_schedule(cfg, make_plan(cfg), run_name), file=sys.stderr, flush=True)
        with progress.logging_above_bar() if progress is not None else nullcontext():
            result = train(cfg, Path(args.run_dir), stop_at_step=args.stop_at_step,
                           time_budget_s=budget, on_progress=progress, extend=args.extend)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - one line for the user; -v shows the traceback
        if getattr(args, "verbose", False):
            raise
        name = type(exc).__name__
        print(f"error: training failed: {name}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if progress is not None:
            progress.close()
        from lora.train.distributed import close_process_group

        close_process_group()  # launched with accelerate launch / torchrun
    payload = {
        "status": "complete" if result.complete else "stopped",
        "exit_code": EXIT_COMPLETE if result.complete else EXIT_STOPPED_EARLY,
        "run_name": run_name, "run_dir": str(Path(args.run_dir).resolve()),
        "global_step": result.global_step, "total_steps": result.total_steps,
        "stopped_reason": None if result.complete else result.stopped_reason,
        "lora_files": [str(p) for p in result.lora_files],
        "training_log": str(RunPaths(Path(args.run_dir).resolve()).log),
    }
    if result.complete:
        _emit(args, payload, [f"run complete at step {result.global_step}/{result.total_steps}; "
                              "LoRA files:", *(f"  {p}" for p in result.lora_files)])
        return EXIT_COMPLETE
    if result.stopped_reason == "step-target" and result.trained_steps == 0:
        # re-running the same command could never progress: a bad limit (exit 2), not exit 3
        print(f"error: the run in {payload['run_dir']} is already at step {result.global_step} of "
              f"{result.total_steps}, at or past --stop-at-step {args.stop_at_step}: nothing to train; "
              "leave it out or give a later step to continue", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if result.stopped_reason == "interrupted":
        saved = "checkpoint saved" if result.global_step > 0 else "no step done yet"
        _emit(args, payload, [f"interrupted at step {result.global_step}/{result.total_steps}: {saved}, "
                              "re-run the same command to continue"])
        return EXIT_STOPPED_EARLY
    how = ("re-run without --stop-at-step, or with a later step, to continue"
           if result.stopped_reason == "step-target" else "re-run the same command to continue")
    _emit(args, payload, [f"stopped at step {result.global_step}/{result.total_steps} "
                          f"({result.stopped_reason}); {how}"])
    return EXIT_STOPPED_EARLY


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train or resume a LoRA run (exit 0 complete, 3 stopped early and resumable)",
        description="Train an SD1.5 LoRA on a data set, or resume the run in --run-dir from its latest "
        "checkpoint. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits 3; "
        "a second one stops at once without a checkpoint. Exit codes: 0 complete, 3 stopped early "
        "(time budget / Ctrl-C or SIGTERM: re-run the same command to continue; --stop-at-step: "
        "re-run without it or with a later step), 2 bad config or data set (or a --stop-at-step "
        "the run has already reached), 1 runtime failure, 130 / 143 a second Ctrl-C / SIGTERM.",
    )
    add_path(parser, "--dataset", role="dataset_dir", required=True,
                        help="data-set folder (with versions/, or any folder of images with .txt captions)")
    add_path(parser, "--run-dir", role="run_dir", required=True,
                        help="run folder: created for a new run, resumed from its latest checkpoint otherwise")
    parser.add_argument("--preset", default=None,
                        help="phase1.5, phase2a (default), phase2a-l2 or phase2b (README: Presets)")
    add_path(parser, "--model", role="input", default=None,
                        help="base model: a Hub id (default stable-diffusion-v1-5/stable-diffusion-v1-5, "
                             "downloaded once, about 4 GB), a diffusers folder, a .safetensors "
                             "checkpoint, or 'tiny' (a small random-weight model for trying things "
                             "out; its LoRAs are useless)")
    add_path(parser, "--config", role="input", default=None, help="JSON or TOML file of training settings")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any training setting by its config name, e.g. --set lr_scheduler=cosine (repeatable)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop the run after this many optimizer steps in total. The epochs also "
                             "end it: the run takes min(--max-steps, epochs x steps per epoch), and "
                             "the start line says which one applies")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training images (preset default, 20 for phase2a); "
                             "--max-steps may end the run earlier")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of data order, noise and timesteps (default 42); same seed, same LoRA")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training resolution, a multiple of 16 (default 512; the tiny model's own size for tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (preset default)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (preset default)")
    add_path(parser, "--run-name", role="run_name", default=None,
                        help="name of the run in logs, the card and the kohya file (default: the run folder's name)")
    parser.add_argument("--checkpoint-every-steps", type=int, default=None,
                        help="write a checkpoint every N steps (default: by time only)")
    parser.add_argument("--checkpoint-every-minutes", type=float, default=None,
                        help="write a checkpoint every N minutes of training (default 10)")
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="stop with a checkpoint before this much time has passed (exit 3)")
    parser.add_argument("--low-memory", action="store_true",
                        help="fit an 8 GB card at batch 4 (gradient checkpointing, no CUDA graphs/compile)")
    parser.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default=None,
                        help="tensor type of the kohya/AUTOMATIC1111/ComfyUI file (default fp16, "
                             "half the size of fp32)")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop at this global step (exit 3)")
    parser.add_argument("--extend", action="store_true",
                        help="train a finished run on to a larger --max-steps, from its final checkpoint "
                        f"(its LoRA files are kept in {KEPT_LORA_PREFIX}<n>/)")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no start line, no progress bar and nothing from third-party "
                             "libraries (the same as animelora -q train ...)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (status, steps, LoRA files) on stdout when "
                             "training ends; progress stays on stderr")
    parser.set_defaults(func=_handler)
