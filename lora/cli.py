"""`animelora` command line: one sub-command per pipeline step.

Each area of the library registers its own sub-commands (``lora/commands/*.py``), so the
CLI grows with the library without one module that knows everything.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# Modules that expose ``register(subparsers)``; a module that is missing is skipped so a
# partial install still gives a working CLI.
COMMAND_MODULES = (
    "lora.commands.data",
    "lora.commands.train",
    "lora.commands.results",
    "lora.commands.ops",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="animelora",
        description="Train anime-style SD1.5 LoRA adapters from Danbooru images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
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
