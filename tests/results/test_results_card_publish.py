"""What the model card claims and what publish refuses: base model, trigger word, data source,
license, visibility and test-model runs. Real staging, the real huggingface_hub client, a
loopback Hub."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from animelora.cli import main
from lora.hub import PublishArgumentError, publish, stage_run
from lora.testing.fakehub import FakeHub

TOKEN = "hf_loopback_test_token_0123456789"
REPO = "me/anime-lora"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _set_model(run: Path, model: str) -> None:
    config = json.loads((run / "config.json").read_text())
    config["model"] = model
    (run / "config.json").write_text(json.dumps(config))


def _front(hub: Path) -> dict:
    return yaml.safe_load((hub / "README.md").read_text().split("---\n")[1])


def _write_version(run: Path, queries: dict[str, str]) -> None:
    versions = run.parent.parent / "datasets" / "demo" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / "v0002.json").write_text(json.dumps({"version": "v0002", "queries": queries,
                                                     "post_ids": [], "files": [], "count": 12}))


def test_a_bad_license_is_refused_before_anything_is_staged(run_copy, capsys):
    assert not (run_copy / "hub").exists()
    code = main(["publish", "--run", str(run_copy), "--repo-id", REPO, "--dry-run",
                 "--license", "MIT License"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --license: 'MIT License'") and "'mit'" in err[0]
    assert not (run_copy / "hub").exists()
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".hub")]
    # a Hub identifier is accepted and lands in the card
    assert main(["publish", "--run", str(run_copy), "--repo-id", REPO, "--dry-run",
                 "--license", "cc-by-nc-4.0"]) == 0
    assert _front(run_copy / "hub")["license"] == "cc-by-nc-4.0"


def test_a_tiny_model_run_is_not_uploaded_without_the_flag(run_copy, hf_env, capsys):
    with FakeHub(valid_tokens={TOKEN}) as hub:
        with pytest.raises(PublishArgumentError, match="--allow-test-model"):
            publish(run_copy, REPO, token=TOKEN, endpoint=hub.url)
        assert hub.requests == [] and not (run_copy / "hub").exists()
        code = main(["publish", "--run", str(run_copy), "--repo-id", REPO, "--endpoint", hub.url])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "tiny" in err[0] and "--allow-test-model" in err[0]
        assert hub.requests == []
        publish(run_copy, REPO, token=TOKEN, endpoint=hub.url, allow_test_model=True)
        card = hub.files[REPO]["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front and "stable-diffusion" not in front["tags"]
    assert "Test artefact" in card and "not on Stable Diffusion 1.5" in card


def test_base_model_hub_id_or_local_checkpoint_name(run_copy):
    _set_model(run_copy, "/home/me/models/animefull-final-pruned.safetensors")
    hub = stage_run(run_copy, repo_id=REPO)
    text = (hub / "README.md").read_text()
    assert "base_model" not in _front(hub)
    assert "`animefull-final-pruned.safetensors`, a local checkpoint" in text
    assert "/home/me" not in text  # local paths stay home

    hub = stage_run(run_copy, repo_id=REPO, base_model="Anything V5")
    text = (hub / "README.md").read_text()
    assert "base_model" not in _front(hub) and "`Anything V5`, a local checkpoint" in text

    hub = stage_run(run_copy, repo_id=REPO, base_model="someone/anything-v5")
    assert _front(hub)["base_model"] == "someone/anything-v5"
    assert ModelCard.load(hub / "README.md").data.base_model == "someone/anything-v5"
    assert 'from_pretrained(\n    "someone/anything-v5"' in (hub / "README.md").read_text()


@pytest.mark.parametrize("queries, says, never", [
    ({"import": "local:/home/me/old_downloads"}, "imported from a local folder", "Danbooru"),
    ({"default": "1girl solo"}, "Danbooru posts selected by tag query (`1girl solo`)", "local folder"),
])
def test_the_card_names_the_data_source_the_version_records(run_copy, queries, says, never):
    _set_model(run_copy, SD15)
    _write_version(run_copy, queries)
    text = (stage_run(run_copy, repo_id=REPO) / "README.md").read_text()
    source = next(line for line in text.splitlines() if line.startswith("- source:"))
    assert says in source and never not in source
    assert "/home/me" not in text


def test_a_plain_folder_is_not_called_danbooru(run_copy):
    _set_model(run_copy, SD15)  # the run's data set has no versions/ record
    text = (stage_run(run_copy, repo_id=REPO) / "README.md").read_text()
    assert "Danbooru" not in text


def test_the_card_does_not_send_a1111_users_to_the_diffusers_file(run_copy):
    _set_model(run_copy, SD15)
    (run_copy / "lora" / "tiny-a.safetensors").unlink()
    text = (stage_run(run_copy, repo_id=REPO) / "README.md").read_text()
    a1111 = text.split("## Use with AUTOMATIC1111 / ComfyUI")[1].split("##")[0]
    assert "only `pytorch_lora_weights.safetensors`" in a1111 and "do not load" not in a1111
    assert "not include" in a1111 and "models/Lora" not in a1111


def test_trigger_word_from_the_kohya_file_reaches_samples_widget_and_card(run_copy):
    from lora.sample import SampleRequest, generate_samples

    _set_model(run_copy, SD15)
    kohya = run_copy / "lora" / "tiny-a.safetensors"
    from safetensors import safe_open

    with safe_open(kohya, "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(kohya), str(kohya), metadata={**meta, "modelspec.trigger_phrase": "mystyle"})

    result = generate_samples("tiny", [run_copy], run_copy / "samples", SampleRequest(seeds=(0,)), device="cpu")
    prompts = {img["prompt"] for img in json.loads(result.json_path.read_text())["images"]}
    assert prompts and all(p.startswith("mystyle, ") for p in prompts)

    hub = stage_run(run_copy, repo_id=REPO)
    front = _front(hub)
    assert front["instance_prompt"] == "mystyle"
    assert front["widget"] and all(w["text"].startswith("mystyle, ") for w in front["widget"])
    text = (hub / "README.md").read_text()
    assert "Trigger word: `mystyle`" in text and '"mystyle, 1girl' in text


def test_publish_json_says_what_was_made_public(run_copy, hf_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(valid_tokens={TOKEN}) as hub:
        assert main(["publish", "--run", str(run_copy), "--repo-id", REPO, "--allow-test-model",
                     "--endpoint", hub.url, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert hub.repos[REPO]["private"] is False
    assert out["visibility"] == "public" and out["private"] is False and out["dry_run"] is False
    assert out["repo_id"] == REPO and out["url"].endswith(REPO)
    assert {f["path"] for f in out["files"]} >= {"README.md", "pytorch_lora_weights.safetensors"}
    assert TOKEN not in json.dumps(out)
