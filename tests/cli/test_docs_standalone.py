"""The project's docs and code stand alone: no references to design notes or files kept
outside the repository (a reader of a clone could not follow them)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACES = ["README.md", "docs", "animelora", "lora", "flows", "tasks", "deployments", "bench"]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|DESIGN\.md|REFERENCE\.md")


def test_no_references_outside_the_repository():
    hits = []
    for place in PLACES:
        path = ROOT / place
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                      if p.suffix in {".py", ".md", ".yaml", ".toml", ".txt"})
        for f in files:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE.search(line):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


def test_readme_says_what_a_new_user_needs():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "downloaded from the Hugging Face Hub" in text and "4.3 GB" in text
    assert "`--model tiny` is for trying things out" in text
    assert "<workspace>/cache/" in text and "ANIMELORA_CACHE" in text
    assert "The repo is public unless you pass `--private`" in text
