"""`animelora` command line: one sub-command per pipeline step.

Each area registers its own sub-commands (``animelora/commands/*.py``), so the CLI grows with
the library without one module that knows everything. The handlers import the library (and,
for ``serve``, the orchestration layer) only when they run, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from typing import Any, Sequence, TextIO

# Modules that expose ``register(subparsers)``; a module that is missing is skipped so a
# partial install still gives a working CLI.
COMMAND_MODULES = (
    "animelora.commands.data",
    "animelora.commands.tag",
    "animelora.commands.train",
    "animelora.commands.results",
    "animelora.commands.ops",
    "animelora.commands.sweep",
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
    # diffusers' bars ("Loading pipeline components...") have no switch of their own before
    # diffusers is imported; tqdm reads TQDM_DISABLE as the default of every bar it draws
    os.environ["TQDM_DISABLE"] = "1"
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


#: (logger, text) of library warnings about nothing the project uses: transformers warns that
#: image processors (which only the unused safety checker needs) fall back without torchvision.
IRRELEVANT_WARNINGS = (("transformers.utils.import_utils", "requires torchvision"),)


class _DropMessages(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def drop_irrelevant_warnings() -> None:
    """Filter :data:`IRRELEVANT_WARNINGS` out for good, with or without ``-q``: they say nothing
    a user can act on and would land between the training progress lines."""
    for name, text in IRRELEVANT_WARNINGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessages(text))


def _add_quiet_everywhere(sub: argparse._SubParsersAction) -> None:
    """``-q`` after any sub-command too (``animelora analyze -q ...``), as ``train`` has it."""
    for name, parser in sub.choices.items():
        if not any("-q" in action.option_strings for action in parser._actions):
            parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                help=f"the same as animelora -q {name} ...: only warnings and errors")


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
    _add_quiet_everywhere(sub)
    return parser


class _Watched:
    """A stream that passes everything on and remembers whether anything was written and the
    last ``error:`` line (the commands' and argparse's one-line errors)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.wrote = False
        self.error: str | None = None

    def write(self, text: str) -> int:
        self.wrote = self.wrote or bool(text)
        for line in text.splitlines():
            head, sep, rest = line.partition("error: ")
            if sep and (not head or head.endswith(": ")):  # "error: x" or "animelora train: error: x"
                self.error = rest.strip()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _wants_json(argv: Sequence[str]) -> bool:
    # "--js", "--jso": argparse takes unambiguous prefixes of a flag
    return any(len(a) >= 4 and "--json".startswith(a) for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. With ``--json``, stdout holds one JSON object even when the command
    fails: ``{"status": "error", "exit_code": N, "error": "..."}`` where it printed none, so a
    script reading stdout never gets an empty string."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _wants_json(argv):
        return _run(argv)
    out, err = _Watched(sys.stdout), _Watched(sys.stderr)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    code: int | str | None = 1
    try:
        code = _run(argv)
        return code
    except SystemExit as exc:  # argparse's usage errors (2); --help and --version exit 0
        code = exc.code
        raise
    finally:
        sys.stdout, sys.stderr = saved
        if code not in (0, None) and not out.wrote:
            print(json.dumps({"status": "error", "exit_code": code if isinstance(code, int) else 1,
                              "error": err.error or ("interrupted" if code == 130 else "failed (see stderr)")}))


def _run(argv: Sequence[str]) -> int:
    drop_irrelevant_warnings()
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
