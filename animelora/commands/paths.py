"""Every name and path argument of every command, declared with its role and checked before work.

Why: a check a command has to remember is a check the next command forgets. A path or name
argument is added with :func:`add_path` and a role; :func:`preflight` (run by ``cli.main``
before any handler) applies :mod:`lora.inputs`'s check for that role, so a bad run folder, repo
id or plot path is one line and exit 2 before a model is loaded. ``tests/cli/test_paths.py``
fails when an argument that looks like a path or a name is added without a role.

Roles:
    workspace, dataset_name, dataset_dir, run_dir, run_name, existing_run, output_png,
    output_dir, repo_id: checked as their names say (lora/inputs.py, lora/owned.py);
    input: read only (a file or folder the command reads; it says itself when it is missing).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from lora import inputs
from lora.inputs import InputError

#: Attribute the roles are kept under, in the parser's defaults (``dest -> role``).
ROLES_DEFAULT = "_path_roles"


def add_path(parser: argparse.ArgumentParser, *flags: str, role: str, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)``, remembering that its value plays ``role``."""
    if role not in CHECKS:
        raise ValueError(f"unknown path role {role!r}")
    action = parser.add_argument(*flags, **kwargs)
    roles = dict(parser.get_default(ROLES_DEFAULT) or {})
    roles[action.dest] = role
    parser.set_defaults(**{ROLES_DEFAULT: roles})
    return action


def _png_is_ours(path: Path) -> bool:
    from lora.analysis.plots import is_animelora_png

    return is_animelora_png(path)


def _existing_run(value: str, flag: str, _args: argparse.Namespace) -> None:
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {value}: run folder not found")
    if not path.is_dir():
        raise InputError(f"{flag} {value} is a file, not a run folder")


def _output_dir(value: str, flag: str, _args: argparse.Namespace) -> None:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {value} is a file; name a folder (a file is never replaced)")
    if inputs.is_workspace_root(path):
        raise InputError(f"{flag} {value} is a workspace folder; name a new sub-folder")
    inside = inputs.dataset_root_of(path)
    if inside is not None:
        raise InputError(f"{flag} {value} is inside the data set {inside}; outputs never go into a data set")


def _run_dir(value: str, flag: str, args: argparse.Namespace) -> None:
    roles = getattr(args, ROLES_DEFAULT, {}) or {}
    dataset = next((getattr(args, dest) for dest, role in roles.items() if role == "dataset_dir"), None)
    inputs.check_run_dir(value, dataset=dataset, flag=flag)


Check = Callable[[Any, str, argparse.Namespace], None]

CHECKS: dict[str, Check] = {
    "workspace": lambda v, flag, a: inputs.check_workspace(v, flag=flag),
    "dataset_name": lambda v, flag, a: inputs.check_run_name(v, what=f"{flag} name"),
    "dataset_dir": lambda v, flag, a: inputs.check_dataset_dir(v, flag=flag),
    "run_dir": _run_dir,
    "run_name": lambda v, flag, a: inputs.check_run_name(v, what=flag),
    "existing_run": _existing_run,
    "output_png": lambda v, flag, a: _check_png(v, flag),
    "output_dir": _output_dir,
    "repo_id": lambda v, flag, a: inputs.check_repo_id(v),
    "input": lambda v, flag, a: None,
}


def _check_png(value: str, flag: str) -> None:
    from lora.owned import NotOursError, check_output_file

    try:
        check_output_file(Path(value).expanduser(), suffixes=(".png",), ours=_png_is_ours,
                          what=f"{flag} (a PNG image)")
    except NotOursError as exc:
        raise InputError(str(exc)) from None


def _flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def preflight(args: argparse.Namespace) -> str | None:
    """The first problem with ``args``' names and paths (one line), or None when all are usable.

    Runs for every command, before its handler: the declared roles, then the environment
    (``$ANIMELORA_CACHE``).
    """
    roles: dict[str, str] = getattr(args, ROLES_DEFAULT, None) or {}
    try:
        for dest, role in roles.items():
            value = getattr(args, dest, None)
            if value is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                CHECKS[role](item, _flag_of(dest), args)
        inputs.check_cache_env()
    except InputError as exc:
        return str(exc)
    return None
