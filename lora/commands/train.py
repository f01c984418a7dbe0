"""`animelora train`: train or resume a LoRA run in a run folder.

Exit codes: 0 the run is complete (LoRA files written); 3 stopped early and resumable
(time budget, --stop-at-step, or a first Ctrl-C / SIGTERM: the current step is finished and
a checkpoint written) — re-run the same command to continue; 2 bad arguments, config or data
set, or a run folder that cannot take this run (a file, another trainer in it, another run's
settings, a finished run without --extend); 1 runtime failure (model cannot load, out of
memory, ...); 130 / 143 a second Ctrl-C / SIGTERM, which stops at once without a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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
    }
    values.update(_parse_set(args.set))
    return values


def _print_progress(info: dict) -> None:
    step, total = info.get("step", 0), info.get("total_steps", 0)
    if step == total or step % 10 == 0 or step == 1:
        eta = info.get("eta_s")
        eta_txt = f"{eta:.0f}s" if isinstance(eta, (int, float)) else "?"
        print(f"step {step}/{total} epoch {info.get('epoch')} loss {info.get('loss', float('nan')):.4f} "
              f"lr {info.get('lr', 0):.2e} eta {eta_txt}", file=sys.stderr, flush=True)


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

    from lora.train import DatasetError, TrainingError, train

    budget = args.time_budget_minutes * 60 if args.time_budget_minutes is not None else None
    try:
        result = train(cfg, Path(args.run_dir), stop_at_step=args.stop_at_step, time_budget_s=budget,
                       on_progress=None if args.quiet else _print_progress, extend=args.extend)
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
        from lora.train.distributed import close_process_group

        close_process_group()  # launched with accelerate launch / torchrun
    if result.complete:
        print(f"run complete at step {result.global_step}/{result.total_steps}; LoRA files:")
        for path in result.lora_files:
            print(f"  {path}")
        return EXIT_COMPLETE
    if result.stopped_reason == "interrupted":
        saved = "checkpoint saved" if result.global_step > 0 else "no step done yet"
        print(f"interrupted at step {result.global_step}/{result.total_steps}: {saved}, "
              "re-run the same command to continue", flush=True)
        return EXIT_STOPPED_EARLY
    print(f"stopped at step {result.global_step}/{result.total_steps} ({result.stopped_reason}); "
          "re-run the same command to continue")
    return EXIT_STOPPED_EARLY


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train or resume a LoRA run (exit 0 complete, 3 stopped early and resumable)",
        description="Train an SD1.5 LoRA on a data set, or resume the run in --run-dir from its latest "
        "checkpoint. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits 3; "
        "a second one stops at once without a checkpoint. Exit codes: 0 complete, 3 stopped early "
        "(time budget / --stop-at-step / Ctrl-C or SIGTERM; re-run the same command to continue), "
        "2 bad config or data set, 1 runtime failure, 130 / 143 a second Ctrl-C / SIGTERM.",
    )
    parser.add_argument("--dataset", required=True, help="data-set folder (versions/ or images with .txt)")
    parser.add_argument("--run-dir", required=True, help="run folder (created, or resumed)")
    parser.add_argument("--preset", default=None, help="phase1.5, phase2a (default), phase2a-l2, phase2b")
    parser.add_argument("--model", default=None, help="'tiny', a Hub id, a diffusers folder or a .safetensors file")
    parser.add_argument("--config", default=None, help="JSON or TOML file of training settings")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any training setting (repeatable)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="learning rate")
    parser.add_argument("--run-name", default=None, help="default: the run folder's name")
    parser.add_argument("--checkpoint-every-steps", type=int, default=None)
    parser.add_argument("--checkpoint-every-minutes", type=float, default=None)
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="stop with a checkpoint before this much time has passed (exit 3)")
    parser.add_argument("--low-memory", action="store_true",
                        help="fit an 8 GB card at batch 4 (gradient checkpointing, no CUDA graphs/compile)")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop at this global step (exit 3)")
    parser.add_argument("--extend", action="store_true",
                        help="train a finished run on to a larger --max-steps, from its final checkpoint "
                        "(its LoRA files are kept in lora-step-<n>/)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-step progress lines")
    parser.set_defaults(func=_handler)
