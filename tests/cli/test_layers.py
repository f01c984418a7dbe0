"""The layers point one way: ``animelora`` (the CLI) → ``deployments`` → ``flows`` → ``tasks`` →
``lora``. The library must never reach up: nothing in ``lora/`` imports the CLI, the
orchestration layer or Prefect, so it can be installed, tested and reused without them.

The check reads the source (nothing is imported, so it is fast) and sees what a quick grep
misses: imports inside functions and ``if TYPE_CHECKING:`` blocks, ``importlib.import_module``
/ ``__import__`` calls, and module names kept in strings for a later dynamic import (the way
``animelora serve`` once loaded ``"deployments.serve"`` from inside ``lora/``).
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "lora"
#: Top-level packages that sit above the library (or are the orchestrator it must not need).
UPPER = ("animelora", "deployments", "flows", "tasks", "prefect")
_DOTTED = re.compile(rf"^({'|'.join(UPPER)})(\.[A-Za-z_]\w*)+$")
_DYNAMIC_IMPORTERS = {"import_module", "__import__", "find_spec"}


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a real module of an upper package (so "prefect.db", a file
    name, is not mistaken for one). Only locates files; imports nothing."""
    top, *rest = dotted.split(".")
    if top == "prefect":
        spec = importlib.util.find_spec("prefect")  # a top-level name: located, not executed
        bases = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    else:
        bases = [ROOT / top]
    for base in bases:
        stem = base.joinpath(*rest)
        if stem.with_suffix(".py").is_file() or (stem / "__init__.py").is_file():
            return True
    return False


def _upward(source: str, module_is_real=_is_module) -> list[tuple[int, str]]:
    """(line, name) of every reference in ``source`` to a package above the library."""
    found: list[tuple[int, str]] = []

    def upper(name: str) -> bool:
        return name.split(".")[0] in UPPER

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if upper(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and upper(node.module):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if (name in _DYNAMIC_IMPORTERS and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str) and upper(arg.value)):
                found.append((node.lineno, arg.value))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _DOTTED.match(node.value) and module_is_real(node.value)):
            found.append((node.lineno, node.value))
    return sorted(set(found))


def test_the_walker_sees_every_kind_of_upward_import():
    source = '''
import os
import prefect
from prefect.logging import get_run_logger
import tasks.train as task_train
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from flows.train_lora import train_lora
def run():
    from animelora.cli import main
    import importlib
    importlib.import_module("deployments.serve")
    __import__("flows")
COMMANDS = ("deployments.serve",)
db = "prefect.db"
from .model import tiny
from lora.data import manifest
'''
    names = [name for _, name in _upward(source, module_is_real=lambda n: n != "prefect.db")]
    assert names == ["prefect", "prefect.logging", "tasks.train", "flows.train_lora",
                     "animelora.cli", "deployments.serve", "flows", "deployments.serve"]


def test_module_names_in_strings_are_checked_against_real_modules():
    assert _is_module("deployments.serve") and _is_module("animelora.commands.ops")
    assert not _is_module("deployments.nothing_here")
    assert not _is_module("prefect.db")  # the server's database file name, not a module


def test_the_library_never_imports_upward():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}"
                 for path in sorted(LIBRARY.rglob("*.py"))
                 for line, name in _upward(path.read_text(encoding="utf-8"))]
    assert not offenders, "lora/ must not import the CLI, orchestration or Prefect:\n" + "\n".join(offenders)
