"""`animelora fetch` as a user runs it: summary on stdout, one-line errors, no secrets on disk."""
from __future__ import annotations

import pytest

from animelora.cli import main as cli
from lora.data.manifest import DatasetPaths, load_manifest
from lora.testing.fakebooru import generate_posts


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch):
    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)


def _fetch_args(server, workspace, *extra):
    return ["fetch", "--booru-url", server.url, "--workspace", str(workspace), "--dataset", "cli",
            "--requests-per-second", "10", "--ratings", "g,s,q,e", *extra]


def test_fetch_prints_summary_and_continues_from_the_cursor(booru_factory, workspace, capsys):
    server = booru_factory(generate_posts(10, seed=4, traps=False))
    rc = cli(_fetch_args(server, workspace, "--tags", "status:any", "--limit", "6",
                         "--trigger-word", "zz", "--max-tags", "3"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "kept 6" in out and "version: v0001" in out and "holds 6 images" in out
    paths = DatasetPaths.of(workspace, "cli")
    df = load_manifest(paths)
    caption = (paths.root / df.file.iloc[0]).with_suffix(".txt").read_text().strip().split(", ")
    assert caption[0] == "zz" and len(caption) == 4

    rc = cli(_fetch_args(server, workspace, "--tags", "status:any", "--limit", "6"))
    out = capsys.readouterr().out
    assert rc == 0 and "kept 4" in out and "v0002" in out and "holds 10 images" in out
    assert sorted(load_manifest(paths).post_id) == list(range(1000, 1010))


def test_too_many_tags_without_credentials_is_a_clear_one_line_error(booru_factory, workspace, capsys):
    server = booru_factory(generate_posts(5, seed=1, traps=False))
    rc = cli(_fetch_args(server, workspace, "--tags", "1girl solo smile"))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "more than 2" in err and "DANBOORU_API_KEY" in err
    assert not [r for r in server.requests if r.path == "/posts.json"]


def test_bad_arguments_exit_2(workspace, capsys):
    assert cli(["fetch", "--workspace", str(workspace), "--dataset", "x"]) == 2
    assert "--tags" in capsys.readouterr().err
    assert cli(["fetch", "--tags", "a", "--ratings", "g,zz", "--workspace", str(workspace)]) == 2
    assert "zz" in capsys.readouterr().err
    assert cli(["fetch", "--tags", "a", "--dataset", "../escape", "--workspace", str(workspace)]) == 2
    assert "dataset name" in capsys.readouterr().err


def test_credentials_are_used_but_never_written_to_disk(booru_factory, workspace, monkeypatch, capsys):
    secret = "S3CRET-api-key-value-9f8e7d"
    server = booru_factory(generate_posts(8, seed=6, traps=False), credentials={"alice": secret})
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", secret)
    # Three tags need an account: allowed with credentials.
    rc = cli(_fetch_args(server, workspace, "--tags", "status:any -video -animated", "--limit", "5"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    api = [r for r in server.requests if r.path == "/posts.json"]
    assert api and all(r.has_auth and r.auth_login == "alice" for r in api)
    assert not any(r.has_auth for r in server.requests if r.path.startswith("/data/"))
    assert secret not in captured.out + captured.err
    for path in workspace.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_wrong_key_is_an_auth_error(booru_factory, workspace, monkeypatch, capsys):
    server = booru_factory(generate_posts(5, seed=6, traps=False), credentials={"alice": "right"})
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", "wrong-key-123")
    rc = cli(_fetch_args(server, workspace, "--tags", "status:any"))
    err = capsys.readouterr().err
    assert rc == 2 and "401" in err and "wrong-key-123" not in err and err.count("\n") == 1


def test_help_defaults_agree_with_the_pipeline():
    """The CLI shows these defaults without importing the fetch pipeline; they must not drift."""
    from animelora.commands import data as data_cmd
    from lora.data.collect import DEFAULT_BOORU_URL, DEFAULT_MAX_FILE_SIZE
    from lora.data.images import DEFAULT_MAX_PIXELS

    assert data_cmd._BOORU_URL_HELP == DEFAULT_BOORU_URL
    assert data_cmd._MAX_PIXELS_HELP == DEFAULT_MAX_PIXELS
    assert data_cmd._MAX_FILE_SIZE_HELP == DEFAULT_MAX_FILE_SIZE
