"""The run folder's file names are spelled in lora/runpaths.py only.

A layout change must be one edit: this test fails when code in lora/, tasks/, flows/ or
deployments/ writes a run-folder name itself (``"training_log.json"``, ``run_dir / "lora"``,
...) instead of asking :class:`lora.runpaths.RunPaths`. Docstrings and comments may name the
files. (Fast: the source is parsed, nothing imported.)
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOTS = ("lora", "animelora", "tasks", "flows", "deployments")
OWNER = "lora/runpaths.py"

#: Names that only a run folder has: not allowed in any string outside the owner.
FILE_NAMES = ("pytorch_lora_weights.safetensors", "training_log.json", "metrics.json", "report.md",
              "samples.json", "loss_curve.png", "lora-step-")
#: Names that are run-folder entries when joined onto a path (``something / "lora"``).
JOINED_NAMES = {"lora", "checkpoints", "samples", "report", "hub", "config.json", ".lock", "grid.png", "runs"}
#: Same names, other folders: (file, name) -> what the folder is.
ALLOWED = {
    ("lora/model/load.py", "config.json"): "a diffusers model folder's unet/config.json",
    ("lora/train/launch.py", "config.json"): "the temporary config handed to torchrun processes",
    ("lora/datapaths.py", ".lock"): "the data set's lock (DatasetPaths)",
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def offences(rel: str, source: str) -> list[str]:
    """Run-folder names spelled out in ``source`` (the file ``rel``), as "file:line: name"."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [(node.lineno, name) for name in FILE_NAMES if name in node.value]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                and isinstance(node.right, ast.Constant) and node.right.value in JOINED_NAMES:
            found.append((node.lineno, f'/ "{node.right.value}"'))
    return [f"{rel}:{line}: {name}" for line, name in sorted(set(found))
            if (rel, name.removeprefix('/ "').removesuffix('"')) not in ALLOWED]


def _sources():
    for root in ROOTS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel == OWNER:
                continue
            yield rel, path.read_text(encoding="utf-8")


def test_no_run_folder_name_is_spelled_outside_runpaths():
    found = [o for rel, source in _sources() for o in offences(rel, source)]
    assert not found, "use lora.runpaths.RunPaths instead of:\n" + "\n".join(found)


def test_the_check_sees_literals_and_joins_but_not_docstrings():
    source = '''"""Writes training_log.json."""
def f(run_dir):
    """Reads run_dir / "lora"."""
    a = run_dir / "training_log.json"
    b = run_dir / "lora" / name
    c = f"{run_dir}/lora-step-{n}"
    return run_dir / "images"
'''
    assert offences("x.py", source) == ["x.py:4: training_log.json", 'x.py:5: / "lora"', "x.py:6: lora-step-"]
    assert offences("lora/datapaths.py", 'p = root / ".lock"') == []
