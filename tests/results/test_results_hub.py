"""Staging, the model card and publishing with the real huggingface_hub client to a loopback Hub."""
from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from animelora.cli import main
from lora.hub import PublishError, publish, stage_run, staged_files
from lora.testing.fakehub import FakeHub

TOKEN = "hf_loopback_test_token_0123456789"
REPO = "me/anime-lora"
SECRET = "hf_planted_secret_do_not_publish_42"  # planted by conftest in config.json, .env, ckpt
REQUIRED_TAGS = {"lora", "stable-diffusion", "stable-diffusion-diffusers", "text-to-image",
                 "anime", "diffusers", "template:sd-lora"}


def _all_bytes_under(*roots: Path) -> list[tuple[Path, bytes]]:
    out = []
    for root in roots:
        if root.exists():
            out += [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]
    return out


def _expected_files(run: Path) -> set[str]:
    images = {f"samples/{p.relative_to(run / 'samples').as_posix()}"
              for p in (run / "samples" / "images").glob("*.png")}
    return {"README.md", "pytorch_lora_weights.safetensors", "tiny-a.safetensors",
            "samples/grid.png", "samples/samples.json", "report/metrics.json",
            "report/loss_curve.png"} | images


def test_staging_is_an_allow_list(run_copy):
    (run_copy / "samples" / "notes.txt").write_text(SECRET)  # not a sample image: stays home
    hub = stage_run(run_copy, repo_id=REPO)
    assert hub == run_copy / "hub"
    staged = {f.path for f in staged_files(hub)}
    assert staged == _expected_files(run_copy)
    assert len([p for p in staged if p.startswith("samples/images/")]) == 12
    for path, data in _all_bytes_under(hub):
        assert SECRET.encode() not in data, path
    # The report was written from the training log because the run had none yet.
    assert (run_copy / "report" / "report.md").exists()
    metrics = json.loads((hub / "report" / "metrics.json").read_text())
    assert "source" not in metrics and metrics["validation"]["final_loss"] == pytest.approx(0.44)


def test_restaging_replaces_only_what_staging_wrote(run_copy):
    hub = stage_run(run_copy, repo_id=REPO)
    card = (hub / "README.md").read_text()
    assert stage_run(run_copy, repo_id=REPO) == hub  # its own, unchanged files: replaced
    assert (hub / "README.md").read_text() == card
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".hub")]


@pytest.mark.parametrize("change", ["edited card", "note", "sub-folder"])
def test_restaging_never_deletes_what_the_user_put_in_hub(run_copy, change):
    """Issue 23 case 1: a hand-edited card, notes and a sub-folder were deleted without a word."""
    from lora.hub.stage import StageArgumentError

    hub = stage_run(run_copy, repo_id=REPO)
    if change == "edited card":
        (hub / "README.md").write_text("# my own words\n")
    elif change == "note":
        (hub / "notes.txt").write_text("mine")
    else:
        (hub / "extra").mkdir()
        (hub / "extra" / "a.txt").write_text("mine")
    before = {p.relative_to(hub).as_posix(): p.read_bytes() for p in hub.rglob("*") if p.is_file()}
    with pytest.raises(StageArgumentError, match="did not write or that were changed") as info:
        stage_run(run_copy, repo_id=REPO)
    assert "--card" in str(info.value)
    assert {p.relative_to(hub).as_posix(): p.read_bytes() for p in hub.rglob("*") if p.is_file()} == before
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".hub")]


def test_an_own_card_is_staged_with_card(run_copy, tmp_path):
    mine = tmp_path / "card.md"
    mine.write_text("# my card\n")
    hub = stage_run(run_copy, repo_id=REPO, card=mine)
    assert (hub / "README.md").read_text() == "# my card\n"


def test_a_private_lora_in_lora_folder_is_never_staged(run_copy):
    """Issue 23 case 2: every *.safetensors in lora/ used to go into a public upload plan."""
    private = run_copy / "lora" / "my-private-style.safetensors"
    private.write_bytes((run_copy / "lora" / "tiny-a.safetensors").read_bytes())
    hub = stage_run(run_copy, repo_id=REPO)
    names = [f.path for f in staged_files(hub)]
    assert "my-private-style.safetensors" not in names and not (hub / private.name).exists()
    assert {"pytorch_lora_weights.safetensors", "tiny-a.safetensors"} <= set(names)


def test_upload_plan_is_the_ledger_not_the_folder(run_copy):
    hub = stage_run(run_copy, repo_id=REPO)
    names = {f.path for f in staged_files(hub)}
    assert ".animelora.json" not in names and "README.md" in names
    (hub / "README.md").write_text("changed after staging")
    with pytest.raises(Exception, match="changed since it was staged"):
        staged_files(hub)


def test_staging_without_lora_files_fails(tmp_path):
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    with pytest.raises(Exception, match="no LoRA weights"):
        stage_run(run, repo_id=REPO)
    assert not (run / "hub").exists()


def test_model_card_front_matter_and_body(run_copy, sample_prompts):
    config = json.loads((run_copy / "config.json").read_text())
    config["model"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (run_copy / "config.json").write_text(json.dumps(config))
    hub = stage_run(run_copy, repo_id=REPO, trigger_word="mystyle")
    text = (hub / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(hub / "README.md")
    data = card.data.to_dict()
    assert data == front
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["license"] == "creativeml-openrail-m"
    assert REQUIRED_TAGS <= set(data["tags"])
    assert data["instance_prompt"] == "mystyle"
    widgets = data["widget"]
    assert [w["text"] for w in widgets] == sample_prompts
    for widget in widgets:
        url = widget["output"]["url"]
        assert url.startswith("samples/images/tiny-a_") and (hub / url).is_file()
        assert widget["parameters"]["negative_prompt"]
    body = card.text
    assert f'load_lora_weights("{REPO}", weight_name="pytorch_lora_weights.safetensors")' in body
    assert "<lora:tiny-a:0.8>" in body and "models/Lora" in body and "ComfyUI" in body
    assert "| learning_rate | 5e-05 |" in body and "| lora_rank | 4 |" in body
    assert "- version: v0002" in body and "- images: 12" in body
    assert "![loss curve](report/loss_curve.png)" in body
    assert "| final loss |" in body and "validation" in body
    assert SECRET not in text


def test_tiny_base_model_is_not_claimed_as_a_hub_model(run_copy):
    hub = stage_run(run_copy, repo_id=REPO)
    data = ModelCard.load(hub / "README.md").data.to_dict()
    assert "base_model" not in data
    assert "`tiny`" in (hub / "README.md").read_text()


def test_publish_sends_exactly_the_staged_files(run_copy, hf_env, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    with FakeHub(valid_tokens={TOKEN}) as hub:
        result = publish(run_copy, REPO, allow_test_model=True, endpoint=hub.url, private=True)
    staged = run_copy / "hub"
    expected = {f.path: (staged / f.path).read_bytes() for f in staged_files(staged)}
    assert hub.files[REPO] == expected
    assert set(expected) == _expected_files(run_copy)
    assert hub.repos[REPO]["private"] is True
    assert [c["summary"] for c in hub.commits] == ["Upload LoRA from run tiny-a"]
    assert result.commit_url and result.url.endswith(REPO)
    # The token travels only as the Authorization header, and never to the LFS storage URL.
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    for request in hub.requests:
        if request["method"] == "PUT":
            assert "authorization" not in request["headers"]
        else:
            assert request["headers"].get("authorization") == f"Bearer {TOKEN}"
        assert TOKEN not in request["path"]
    # ... and nowhere else: not in the files sent, written, logged or printed.
    for path, data in expected.items():
        assert TOKEN.encode() not in data, path
    for path, data in _all_bytes_under(run_copy, hf_env):
        assert TOKEN.encode() not in data, path
    out = capsys.readouterr()
    assert TOKEN not in caplog.text + out.out + out.err + repr(result) + result.describe()


def test_bad_token_is_one_line_and_keeps_the_staged_folder(run_copy, hf_env, caplog):
    bad = "hf_this_token_is_not_valid_987654"
    with FakeHub(valid_tokens={TOKEN}) as hub, pytest.raises(PublishError) as info:
        publish(run_copy, REPO, token=bad, allow_test_model=True, endpoint=hub.url)
    message = str(info.value)
    assert "\n" not in message and "401" in message and "token" in message
    assert bad not in message and bad not in caplog.text
    assert (run_copy / "hub" / "README.md").exists()
    assert REPO not in hub.files


@pytest.mark.parametrize("status", [403, 409])
def test_repo_owned_by_someone_else(run_copy, hf_env, status):
    with FakeHub(valid_tokens={TOKEN}, foreign_repos={"someone/taken"},
                 foreign_status=status) as hub, pytest.raises(PublishError) as info:
        publish(run_copy, "someone/taken", token=TOKEN, allow_test_model=True, endpoint=hub.url)
    message = str(info.value)
    assert "\n" not in message and TOKEN not in message
    assert "owned by someone else" in message and "someone/taken" in message
    assert (run_copy / "hub" / "pytorch_lora_weights.safetensors").exists()
    assert "someone/taken" not in hub.files


def test_no_token(run_copy, hf_env):
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN") as info:
        publish(run_copy, REPO, allow_test_model=True, endpoint="http://127.0.0.1:9")
    assert "\n" not in str(info.value)
    assert (run_copy / "hub" / "README.md").exists()


def test_unreachable_hub(run_copy, hf_env):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PublishError, match="cannot reach the Hub") as info:
        publish(run_copy, REPO, token=TOKEN, allow_test_model=True, endpoint=f"http://127.0.0.1:{port}")
    assert "\n" not in str(info.value) and TOKEN not in str(info.value)
    assert (run_copy / "hub" / "README.md").exists()


def test_dry_run_sends_nothing(run_copy, hf_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(valid_tokens={TOKEN}) as hub:
        result = publish(run_copy, REPO, allow_test_model=True, endpoint=hub.url, dry_run=True)
        assert result.dry_run and {f.path for f in result.files} == _expected_files(run_copy)
        assert main(["publish", "--run", str(run_copy), "--repo-id", REPO, "--dry-run",
                     "--endpoint", hub.url]) == 0
    assert hub.requests == []
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out and REPO in out
    assert "pytorch_lora_weights.safetensors" in out and "KiB" in out
    assert TOKEN not in out


def test_cli_publish_and_cli_errors(run_copy, hf_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(valid_tokens={TOKEN}) as hub:
        assert main(["publish", "--run", str(run_copy), "--repo-id", REPO, "--private",
                     "--allow-test-model", "--endpoint", hub.url]) == 0
        assert "published:" in capsys.readouterr().out
        assert "README.md" in hub.files[REPO]
        monkeypatch.setenv("HF_TOKEN", "hf_wrong_wrong_wrong")
        assert main(["publish", "--run", str(run_copy), "--repo-id", REPO,
                     "--allow-test-model", "--endpoint", hub.url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "401" in err[0]
    assert "hf_wrong_wrong_wrong" not in err[0]
    assert main(["publish", "--run", str(run_copy), "--repo-id", "no-slash", "--dry-run"]) == 2  # usage
    assert "USER/NAME" in capsys.readouterr().err


def test_a_staged_file_holding_the_token_is_never_sent(run_copy, hf_env):
    with FakeHub(valid_tokens={TOKEN}) as hub, pytest.raises(PublishError) as info:
        publish(run_copy, REPO, token=TOKEN, allow_test_model=True, endpoint=hub.url, trigger_word=TOKEN)
    assert "refusing to upload" in str(info.value) and "README.md" in str(info.value)
    assert TOKEN not in str(info.value)
    assert hub.requests == []
