"""The CLI must start on native Windows, where ``fcntl`` (and other POSIX-only modules) do not exist.

Windows cannot run here, so the closest honest check is: run the real CLI in a subprocess where
any ``import fcntl`` made by the project's own code raises ImportError, as it would on Windows.
Third-party packages keep their POSIX imports (on Windows they take their own Windows branch),
so the blocker only refuses imports whose importing frame belongs to the project.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("animelora", "lora", "flows", "tasks", "deployments")
POSIX_ONLY = {"fcntl", "pwd", "grp", "termios", "tty", "pty", "resource", "posix", "syslog", "crypt"}

BLOCKER = textwrap.dedent(f"""
    import sys

    _PROJECT = {PROJECT_PACKAGES!r}


    def _importer_is_project():
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__", "") or ""
            if not name.startswith(("importlib", "_frozen_importlib")):
                return name.split(".")[0] in _PROJECT
            frame = frame.f_back
        return False


    class _NoFcntl:
        def find_spec(self, name, path=None, target=None):
            if name == "fcntl" and _importer_is_project():
                raise ImportError("No module named 'fcntl' (as on Windows)", name="fcntl")
            return None


    sys.meta_path.insert(0, _NoFcntl())
    sys.modules.pop("fcntl", None)
""")


def _env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return env


def test_blocker_really_blocks_project_imports(tmp_path):
    """Guard for the test itself: code of the project that imports fcntl fails under the blocker."""
    probe = textwrap.dedent("""
        import types, sys
        mod = types.ModuleType("lora.fake_posix")
        try:
            exec("import fcntl", mod.__dict__)
            print("imported")
        except ImportError as exc:
            print("blocked", exc)
    """)
    result = subprocess.run([sys.executable, "-c", probe], env=_env(tmp_path), capture_output=True,
                            text=True, timeout=60)
    assert "blocked" in result.stdout, result.stdout + result.stderr


def test_every_command_imports_and_help_works_without_fcntl(tmp_path):
    """Import each command module and the modules their handlers use, then run --help of each."""
    script = textwrap.dedent("""
        import importlib, sys
        from animelora.cli import COMMAND_MODULES, main
        for name in COMMAND_MODULES + ("lora.data.manifest", "lora.data.refresh",
                                       "lora.data.importer", "lora.hub", "lora.analysis"):
            importlib.import_module(name)
        from lora.data.manifest import DatasetPaths, dataset_lock
        with dataset_lock(DatasetPaths.of(sys.argv[1], "probe")):
            print("locked")
        for argv in (["--help"], ["fetch", "--help"], ["import", "--help"], ["train", "--help"],
                     ["publish", "--help"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ws")], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "locked" in result.stdout and result.stdout.rstrip().endswith("ok")

    cli = subprocess.run([sys.executable, "-m", "animelora", "--help"], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "fetch" in cli.stdout and "train" in cli.stdout


def test_no_module_level_posix_only_imports():
    """A module-level ``import fcntl`` anywhere in the project stops it from starting on Windows."""
    offenders = []
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in tree.body:
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module.split(".")[0]]
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                              for n in names if n in POSIX_ONLY]
    assert not offenders, offenders
