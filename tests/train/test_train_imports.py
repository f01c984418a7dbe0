"""lora/train/ has no import cycle: every ``import`` statement between its modules (also those
inside functions and ``if TYPE_CHECKING:`` blocks) points one way, so each module can be read,
tested and changed without the ones that use it. (Fast: the source is parsed, nothing imported.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import lora.train

PACKAGE = "lora.train"
ROOT = Path(lora.train.__file__).resolve().parent


def _module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path) -> set[str]:
    """The lora.train modules that ``path`` imports (any statement anywhere in the file)."""
    modules = {_module_name(p) for p in ROOT.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            # relative imports (level 1) are relative to lora/train/ itself, from any of its files
            target = (PACKAGE + (f".{node.module}" if node.module else "")) if node.level == 1 else (node.module or "")
            for alias in node.names:
                # "from . import checkpoint" needs the submodule, "from lora.train import train" the package
                name = f"{target}.{alias.name}"
                found.add(name if name in modules else target)
    found &= modules
    found.discard(_module_name(path))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_walker_sees_relative_and_deferred_imports():
    graph = {_module_name(p): _imports(p) for p in ROOT.glob("*.py")}
    assert "lora.train.step" in graph["lora.train.loop"]           # from .step import ...
    assert "lora.train.step" in graph["lora.train.pipeline"]       # under TYPE_CHECKING
    assert "lora.train" in graph["lora.train.launch"]              # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_lora_train_has_no_import_cycle():
    graph = {_module_name(p): _imports(p) for p in ROOT.glob("*.py")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
