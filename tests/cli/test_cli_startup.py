"""Starting the CLI must not pay for libraries a command does not use yet.

Building the parser (every ``--help``, and the first thing ``animelora train`` does) imports no
torch, diffusers, transformers, Prefect, the Danbooru client or image libraries: the commands
import those inside their handlers, when they run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "prefect", "requests",
         "PIL", "imagehash", "pyarrow", "pandas", "matplotlib", "huggingface_hub", "scipy")


def test_building_the_cli_imports_nothing_heavy():
    code = ("import sys; from animelora.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at CLI start: {done.stdout.strip()}"
