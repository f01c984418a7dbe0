"""The write policy (lora/owned.py) holds by construction: no code deletes, renames over or
replaces a file except in the places listed here, each with the reason it may.

A new ``rmtree``/``unlink``/``os.replace``/``swap_dir`` anywhere else fails this test: use
``lora.owned.build_folder`` (folders rebuilt whole, with a ledger), ``lora.fsutil.atomic_write*``
(files the project owns), or add the call here with the proof that what it removes is the
project's own."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lora.owned import FolderKind, NotOursError, build_folder, check_output_file, foreign_entries, record_files

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("lora", "tasks", "flows", "animelora", "deployments")
#: Calls that delete or replace something on disk.
DESTRUCTIVE = {"rmtree", "unlink", "rmdir", "remove", "swap_dir", "move", "replace", "rename"}

#: module -> why it may delete or replace (what it removes is provably its own).
ALLOWED = {
    "lora/fsutil.py": "the primitives: temporary files it created, the folder swap",
    "lora/owned.py": "the policy: folders whose every file is in its ledger and unchanged",
    "lora/sample.py": "its own temporary folder; the swap after owned.check_replaceable",
    "lora/data/commit.py": "moves staged files into images/ under the data-set lock",
    "lora/data/staging.py": "the data set's own .staging/ files",
    "lora/data/prepare.py": "a prepared file it just wrote in .staging/",
    "lora/model/tiny.py": "the tiny model's cache folder, built under a temporary name",
    "lora/model/export.py": "its own temporary export folder",
    "deployments/prefect_yaml.py": "the generated prefect.yaml (a test keeps it equal to the generator's)",
}
#: Packages whose files may delete their own run-folder state: the trainer's checkpoints
#: (complete only with checkpoint.json), its temporary export folder, its lock.
ALLOWED_PACKAGES = {
    "lora/train/": "checkpoints it wrote (checksummed), its export's temporary folder, its lock",
}


def _destructive_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name not in DESTRUCTIVE:
            continue
        text = ast.unparse(func)
        if name == "replace" and not (text.startswith("os.") or text.endswith("tmp.replace")):
            continue  # str.replace, DataFrame.replace, KeptCopies.replace ...
        if name == "remove" and not text.startswith("os."):
            continue  # list.remove, set.remove
        if name == "move" and not text.startswith("shutil."):
            continue
        found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: {text}")
    return found


def test_only_listed_modules_delete_or_replace_files():
    offenders = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("lora/testing/") or rel in ALLOWED:
                continue
            if any(rel.startswith(prefix) for prefix in ALLOWED_PACKAGES):
                continue
            offenders += _destructive_calls(path)
    assert not offenders, ("delete/replace outside the write policy (see this test's docstring): "
                           + "; ".join(offenders))


KIND = FolderKind("a test folder", legacy=("made.txt",))


def test_a_folder_is_rebuilt_only_while_everything_in_it_is_ours(tmp_path):
    target = tmp_path / "out"
    with build_folder(target, KIND) as tmp:
        (tmp / "a.txt").write_text("one")
    assert foreign_entries(target, KIND) == []
    with build_folder(target, KIND) as tmp:  # our own, unchanged: replaced
        (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "two"
    (target / "a.txt").write_text("edited by hand")
    (target / "mine.txt").write_text("mine")
    with pytest.raises(NotOursError, match=r"a\.txt \(edited\)"):
        with build_folder(target, KIND) as tmp:
            (tmp / "a.txt").write_text("three")
    assert (target / "a.txt").read_text() == "edited by hand" and (target / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_a_folder_from_before_ledgers_is_ours_only_by_its_generated_names(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "made.txt").write_text("x")
    assert foreign_entries(legacy, KIND) == []
    (legacy / "notes.md").write_text("mine")
    assert foreign_entries(legacy, KIND) == ["notes.md"]


def test_a_failure_while_building_leaves_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "made.txt").write_text("old")
    record_files(target)
    with pytest.raises(RuntimeError):
        with build_folder(target, KIND) as tmp:
            (tmp / "made.txt").write_text("new")
            raise RuntimeError("boom")
    assert (target / "made.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_file_is_written_only_where_nothing_is_or_over_our_own(tmp_path):
    ours = lambda p: p.read_bytes().startswith(b"OURS")  # noqa: E731
    free = tmp_path / "plot.png"
    assert check_output_file(free, suffixes=(".png",), ours=ours, what="--plot") == free
    free.write_bytes(b"OURS...")
    assert check_output_file(free, suffixes=(".png",), ours=ours, what="--plot") == free
    free.write_bytes(b"a photo")
    with pytest.raises(NotOursError, match="not written by animelora"):
        check_output_file(free, suffixes=(".png",), ours=ours, what="--plot")
    with pytest.raises(NotOursError, match="must end in .png"):
        check_output_file(tmp_path / "training_log.json", suffixes=(".png",), ours=ours, what="--plot")
    with pytest.raises(NotOursError, match="does not exist"):
        check_output_file(tmp_path / "no" / "x.png", suffixes=(".png",), ours=ours, what="--plot")
