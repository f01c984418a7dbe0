"""lora/ has no import circle: every ``import`` between its modules points one way, so each
module can be read, tested and changed without the ones that use it.

The graph counts every import statement, also those inside functions and under
``if TYPE_CHECKING:`` (a deferred import that hides a circle is still a circle), and what
Python really runs: importing ``lora.train.plan`` first runs ``lora/train/__init__.py``, so
the importer depends on the package too, except on its own parent packages, which Python has
already started before it. (Fast: the source is parsed, nothing imported.)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "lora"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the packages Python starts before the module itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = importer if is_package else importer.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, importer: str, modules: set[str], *, is_package: bool = False) -> set[str]:
    """The modules of ``modules`` that running ``importer`` (whose text is ``source``) imports."""
    named: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, importer, is_package)
            named.add(target)
            named.update(f"{target}.{a.name}" for a in node.names)  # "from pkg import submodule"
    found = {m for name in named for m in (*_ancestors(name), name) if m in modules}
    return found - {importer, *_ancestors(importer)}


def import_graph(root: Path = LIBRARY) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {_module_name(p, root.parent) for p in paths}
    return {_module_name(p, root.parent): imports_of(p.read_text(encoding="utf-8"), _module_name(p, root.parent),
                                                    modules, is_package=p.name == "__init__.py")
            for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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


def test_the_walker_sees_deferred_relative_and_package_imports():
    modules = {"lora", "lora.config", "lora.model", "lora.model.tiny", "lora.train", "lora.train.plan",
               "lora.train.step", "lora.train.step.runner"}
    source = '''
from typing import TYPE_CHECKING
from ..step import runner
if TYPE_CHECKING:
    from lora.config import TrainConfig
def later():
    from lora.model.tiny import TINY_RESOLUTION
import lora.train.plan
'''
    found = imports_of(source, "lora.train.run.loop", modules)
    # lora.model: running lora.model.tiny runs the package first; lora and lora.train are the
    # importer's own parents (already running), so no edge to them
    assert found == {"lora.config", "lora.model", "lora.model.tiny", "lora.train.plan", "lora.train.step",
                     "lora.train.step.runner"}
    assert imports_of("from . import plan", "lora.train", modules, is_package=True) == {"lora.train.plan"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_walker_finds_a_circle_through_a_package():
    """The circle issue 25 named: config -> lora.model (its __init__ imports metadata) ->
    metadata -> lora.train.plan (runs lora/train/__init__, which reaches config)."""
    graph = {"lora.config": {"lora.model"}, "lora.model": {"lora.model.metadata"},
             "lora.model.metadata": {"lora.train", "lora.train.plan"}, "lora.train": {"lora.train.loop"},
             "lora.train.loop": {"lora.config"}, "lora.train.plan": set()}
    assert find_cycle(graph) == ["lora.config", "lora.model", "lora.model.metadata", "lora.train",
                                 "lora.train.loop", "lora.config"]


def test_lora_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


#: lora/train/'s layers, top first: a module imports only from its own layer or those below it,
#: so a call never goes back up (the loop lends no method to the step, the step none to an executor).
TRAIN_LAYERS = [
    ["lora.train", "lora.train.launch"],
    ["lora.train.run"],
    ["lora.train.setup"],
    ["lora.train.export", "lora.train.validation", "lora.train.samples"],
    ["lora.train.checkpoint"],
    ["lora.train.step"],
    ["lora.train.speed"],
    ["lora.train.data"],
    ["lora.train.errors", "lora.train.seeds", "lora.train.distributed"],
]


def _layer(module: str) -> int | None:
    """The layer of a lora.train module (its longest matching prefix), None outside lora.train."""
    best = None
    for i, prefixes in enumerate(TRAIN_LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def test_lora_train_imports_only_go_down_its_layers():
    graph = import_graph()
    modules = [m for m in graph if m.startswith("lora.train")]
    assert all(_layer(m) is not None for m in modules), [m for m in modules if _layer(m) is None]
    upward = [f"{m} -> {t}" for m in modules for t in sorted(graph[m])
              if _layer(t) is not None and _layer(t) < _layer(m)]
    assert not upward, "lora/train/ imports that go up a layer:\n" + "\n".join(upward)
