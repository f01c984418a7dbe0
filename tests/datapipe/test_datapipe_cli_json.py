"""`animelora fetch --json` and `import --json`: one JSON object on stdout a script can read."""
from __future__ import annotations

import json

import pytest

from animelora.cli import main as cli
from lora.testing.fakebooru import generate_posts


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch):
    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)


def test_fetch_json_is_one_object(booru_factory, workspace, capsys):
    server = booru_factory(generate_posts(8, seed=4, traps=False))
    rc = cli(["fetch", "--booru-url", server.url, "--workspace", str(workspace), "--dataset", "j",
              "--requests-per-second", "10", "--ratings", "g,s,q,e", "--tags", "status:any",
              "--limit", "5", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)  # the whole of stdout, nothing else
    assert data["dataset"] == "j" and data["kept"] == 5 and data["version"] == "v0001"
    assert data["total_kept"] == 5 and data["seen"] >= 5 and isinstance(data["reasons"], dict)


def test_import_json_is_one_object(workspace, tmp_path, img, capsys):
    src = tmp_path / "mine"
    img.save(src / "a.png", 1)
    img.save(src / "b.png", 2)
    img.save(src / "small.png", 3, size=(200, 300))
    rc = cli(["import", "--from", str(src), "--workspace", str(workspace), "--dataset", "m", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (data["kept"], data["rejected"]) == (2, 1) and data["reasons"] == {"too-small": 1}
    assert data["version"] == "v0001"
