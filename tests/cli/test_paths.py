"""Names and paths are checked in one place before any work (animelora/commands/paths.py,
lora/inputs.py): a run folder in the wrong place, a plot over someone's file, a repo id the Hub
refuses, a cache that is a file are one line and exit 2, and nothing on disk changes."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from animelora.cli import build_parser, main
from animelora.commands.paths import ROLES_DEFAULT
from lora.testing.datasets import write_synthetic_dataset

#: Words in a flag's name, metavar or help that say its value is a path or a name.
_PATHLIKE = ("folder", "file", "path", "dir", "run", "repo", "workspace", "dataset", "model",
             "config", "prompts", "out", "plot", "from", "name")
#: Flags that mention one of those words but take no path or name (checked by hand).
_NOT_PATHS = {"json", "dry_run", "private", "allow_test_model", "extend", "follow_symlinks",
              "include_artist", "rescore", "trigger_word", "base_model", "license", "endpoint",
              "booru_url", "query", "tags", "limit", "target_size", "ratings", "max_file_mb",
              "allow_file_host", "group_parents", "requests_per_second", "max_steps", "epochs",
              "stop_at_step", "time_budget_minutes", "checkpoint_every_steps",
              "checkpoint_every_minutes", "low_memory", "save_dtype", "set", "preset", "quiet",
              "device", "seeds", "steps", "resolution", "scheduler", "negative_prompt",
              "lora_scale", "guidance", "spike_threshold", "min_side", "blacklist", "max_tags",
              "radius", "max_megapixels", "batch_size", "lr", "seed", "help", "version", "verbose",
              "file_timeout"}


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_every_path_or_name_argument_declares_its_role():
    """A new output path gets the checks without anyone remembering them: this fails first."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undeclared = []
    for name, command in sub.choices.items():
        roles = command.get_default(ROLES_DEFAULT) or {}
        for action in command._actions:
            words = " ".join([action.dest, str(action.metavar or ""), " ".join(action.option_strings)])
            looks_like_path = any(w in words.lower() for w in _PATHLIKE)
            if looks_like_path and action.dest not in roles and action.dest not in _NOT_PATHS:
                undeclared.append(f"{name} {action.option_strings or action.dest}")
    assert not undeclared, f"declare these with animelora.commands.paths.add_path: {undeclared}"


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    write_synthetic_dataset(ws / "datasets" / "anime", 4, [(64, 64)])
    (ws / "runs").mkdir()
    return ws


@pytest.mark.parametrize("where", ["dataset", "images", "inside", "workspace", "runs"])
def test_train_refuses_a_run_folder_that_is_not_a_run_folder(workspace, capsys, where):
    dataset = workspace / "datasets" / "anime"
    run_dir = {"dataset": dataset, "images": dataset / "images", "inside": dataset / "runs" / "x",
               "workspace": workspace, "runs": workspace / "runs"}[where]
    before = _tree(workspace)
    code = main(["train", "--dataset", str(dataset), "--run-dir", str(run_dir), "--model", "tiny",
                 "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --run-dir") and len(err.strip().splitlines()) == 1
    assert _tree(workspace) == before
    assert not (dataset / "runs").exists()


@pytest.mark.parametrize("name", ["a/b", "bad:name", "x" * 101, "trailing.", "CON"])
def test_train_refuses_a_run_name_the_export_could_not_write(workspace, capsys, name):
    code = main(["train", "--dataset", str(workspace / "datasets" / "anime"),
                 "--run-dir", str(workspace / "runs" / "ok"), "--run-name", name, "--model", "tiny"])
    assert code == 2
    assert "--run-name" in capsys.readouterr().err
    assert not (workspace / "runs" / "ok").exists()


def test_analyze_plot_never_writes_over_a_log_or_a_users_image(workspace, capsys, tmp_path):
    run = workspace / "runs" / "r"
    run.mkdir()
    log = {"losses": [{"epoch": 1, "loss": 0.2, "time_seconds": 1}, {"epoch": 2, "loss": 0.1, "time_seconds": 1}]}
    (run / "training_log.json").write_text(json.dumps(log))
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(photo)
    photo_bytes = photo.read_bytes()
    for target in (run / "training_log.json", photo, tmp_path / "plot.jpg"):
        before = target.read_bytes() if target.exists() else None
        assert main(["analyze", str(run), "--plot", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(target) in err
        assert (target.read_bytes() if target.exists() else None) == before
    assert photo.read_bytes() == photo_bytes
    assert json.loads((run / "training_log.json").read_text()) == log
    # A plot animelora wrote is replaced by the next one.
    ours = tmp_path / "loss.png"
    assert main(["analyze", str(run), "--plot", str(ours)]) == 0
    assert main(["analyze", str(run), "--plot", str(ours)]) == 0
    assert ours.is_file()


@pytest.mark.parametrize("repo_id", ["you/anime--lora", "you/-lora", "you/lora.", "you/a b",
                                     "you/" + "x" * 97, "you/lora.git", "/lora"])
def test_publish_checks_the_hubs_repo_id_rules_even_in_a_dry_run(workspace, capsys, repo_id):
    run = workspace / "runs" / "r"
    run.mkdir()
    assert main(["publish", "--run", str(run), "--repo-id", repo_id, "--dry-run"]) == 2
    assert "--repo-id" in capsys.readouterr().err
    assert not (run / "hub").exists()


def test_a_cache_location_that_is_a_file_is_refused_before_work(workspace, capsys, monkeypatch, tmp_path):
    cache_file = tmp_path / "cache.txt"
    cache_file.write_text("not a folder")
    monkeypatch.setenv("ANIMELORA_CACHE", str(cache_file))
    code = main(["train", "--dataset", str(workspace / "datasets" / "anime"),
                 "--run-dir", str(workspace / "runs" / "r"), "--model", "tiny"])
    assert code == 2
    assert "ANIMELORA_CACHE" in capsys.readouterr().err
    assert cache_file.read_text() == "not a folder"
    assert not (workspace / "runs" / "r").exists()
