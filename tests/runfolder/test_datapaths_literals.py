"""The data-set folder's names are spelled in lora/datapaths.py only.

As for run folders (test_runpaths_literals.py): a layout change must be one edit, so this test
fails when code in lora/, tasks/, flows/, deployments/, animelora/ or bench/ writes a data-set
name itself (``ws / "datasets" / name``, ``root / "versions"``, ``"manifest.parquet"``,
``f"images/{name}"``, ``parent.name == "datasets"``) instead of asking
:class:`lora.datapaths.DatasetPaths`. Docstrings and comments may name the files. (Fast: the
source is parsed, nothing imported.)
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOTS = ("lora", "animelora", "tasks", "flows", "deployments", "bench")
OWNER = "lora/datapaths.py"

#: Names only a data set has: not allowed in any string outside the owner.
FILE_NAMES = ("manifest.parquet", "split.json", ".staging")
#: A string that is exactly one of these is the workspace's data-set folder (``== "datasets"``,
#: a tuple of markers); a string starting with one of the prefixes is a version's file entry.
EXACT_NAMES = {"datasets"}
ENTRY_PREFIXES = ("images/", "versions/")
#: Names that are data-set entries when joined onto a path (``something / "images"``).
JOINED_NAMES = {"datasets", "images", "versions", "state.json", "prepared", "rows", "download"}
#: Same names, other folders: (file, name) -> what the folder is.
ALLOWED = {
    ("bench/train.py", "images/"): "the table's images/s column",
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _in_string(text: str, joined: bool) -> list[str]:
    found = [name for name in FILE_NAMES if name in text]
    found += [name for name in EXACT_NAMES if text == name and not joined]  # a join says it already
    return found + [prefix for prefix in ENTRY_PREFIXES if text.startswith(prefix)]


def offences(rel: str, source: str) -> list[str]:
    """Data-set names spelled out in ``source`` (the file ``rel``), as "file:line: name"."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    joins = [node.right for node in ast.walk(tree) if isinstance(node, ast.BinOp)
             and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
             and node.right.value in JOINED_NAMES]
    found = [(node.lineno, f'/ "{node.value}"') for node in joins]
    joined = {id(node) for node in joins}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [(node.lineno, name) for name in _in_string(node.value, id(node) in joined)]
    return [f"{rel}:{line}: {name}" for line, name in sorted(set(found))
            if (rel, name.removeprefix('/ "').removesuffix('"')) not in ALLOWED]


def _sources():
    for root in ROOTS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel != OWNER:
                yield rel, path.read_text(encoding="utf-8")


def test_no_dataset_folder_name_is_spelled_outside_datapaths():
    found = [o for rel, source in _sources() for o in offences(rel, source)]
    assert not found, "use lora.datapaths.DatasetPaths instead of:\n" + "\n".join(found)


def test_the_check_sees_literals_joins_and_entries_but_not_docstrings():
    source = '''"""Reads manifest.parquet and ws / "datasets"."""
def f(ws, name, root):
    """Reads root / "versions"."""
    a = ws / "datasets" / name
    b = root / "manifest.parquet"
    c = f"images/{name}"
    d = root.parent.name == "datasets"
    e = root / ".staging" / "prepared"
    return {"images": 1, "versions": [a]}
'''
    assert offences("x.py", source) == [
        'x.py:4: / "datasets"', "x.py:5: manifest.parquet", "x.py:6: images/",
        "x.py:7: datasets", "x.py:8: .staging", 'x.py:8: / "prepared"']
    assert offences("bench/train.py", 'header = "images/s"') == []
