"""`animelora` command line: one sub-command per pipeline step.

Each area registers its own sub-commands (``animelora/commands/*.py``), so the CLI grows with
the library without one module that knows everything. The handlers import the library (and,
for ``serve``, the orchestration layer) only when they run, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import Sequence

# Modules that expose ``register(subparsers)``; a module that is missing is skipped so a
# partial install still gives a working CLI.
COMMAND_MODULES = (
    "animelora.commands.data",
    "animelora.commands.train",
    "animelora.commands.results",
    "animelora.commands.ops",
)


#: Libraries whose own logging, warnings and progress bars ``-q`` silences.
THIRD_PARTY_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft",
                       "torch", "urllib3", "httpx", "filelock", "PIL")


def package_version() -> str:
    """The installed ``animelora`` version (``unknown`` when run from a plain checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("animelora")
    except PackageNotFoundError:
        return "unknown"


def quiet_third_party() -> None:
    """Silence what transformers, diffusers, huggingface_hub and friends print on their own.

    Their verbosity is read from the environment when they are first imported (the commands
    import them lazily, after this runs); libraries already imported are set directly.
    """
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DIFFUSERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        lib = sys.modules.get(module)
        if lib is not None:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="animelora",
        description="Train anime-style SD1.5 LoRA adapters from Danbooru images.",
    )
    parser.add_argument("--version", action="version", version=f"animelora {package_version()}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and a traceback on errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors: no progress bars, no info lines, and "
                             "nothing from transformers/diffusers/huggingface_hub")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False) and not args.verbose
    if quiet:
        quiet_third_party()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from animelora.commands.paths import preflight

    problem = preflight(args)  # every name and path checked before any work (exit 2)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last net: one line, exit 1; -v shows the traceback
        if args.verbose:
            raise
        detail = " ".join(str(exc).split())[:300]
        print(f"error: {args.command} failed: {type(exc).__name__}{': ' + detail if detail else ''} "
              "(run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
