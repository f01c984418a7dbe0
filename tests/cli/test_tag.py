"""`animelora tag`: a WD14-style ONNX tagger writes kohya captions for untagged images (issue 24).

The model is a real ONNX graph the test builds (mean colour -> one logit per tag -> sigmoid),
laid out as SmilingWolf's repos are (model.onnx + selected_tags.csv), so the real onnxruntime
session, the BGR/white-padding preprocessing and the caption rules all run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx; in the dev extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'animelora[tagger]')")

from animelora.cli import main  # noqa: E402

# name, category, weight on (B, G, R) mean/255, bias: a logit per tag
TAGS = [
    ("general", 9, (0, 0, 0), 5.0),
    ("sensitive", 9, (0, 0, 0), -5.0),
    ("1girl", 0, (0, 0, 0), 3.0),
    ("blue_background", 0, (8, 0, 0), -4.0),
    ("red_theme", 0, (0, 0, 8), -4.0),
    ("long_hair", 0, (0, 0, 4), -4.0),  # 0.5 on a red image
    ("highres", 0, (0, 0, 0), 5.0),  # a meta tag: never in a caption
    ("hatsune_miku", 4, (0, 0, 7), -4.0),  # 0.95 on a red image
]
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def write_model(folder: Path, side: int = 32) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in TAGS], dtype=np.float32).T / 255.0  # 3 x tags
    bias = np.array([t[3] for t in TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits"]),
         helper.make_node("Add", ["logits", "b"], ["shifted"]),
         helper.make_node("Sigmoid", ["shifted"], ["predictions_sigmoid"])],
        "wd-test",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tagger") / "wd-test")


def _image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 64) -> Path:
    """A noisy image of about ``colour`` (noise: so import does not see duplicates)."""
    noise = np.random.default_rng(seed).integers(-30, 30, (size, size, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture()
def folder(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _image(src / "red.png", RED, 1)
    _image(src / "sub" / "blue.png", BLUE, 2)
    _image(src / "captioned.png", RED, 3)
    (src / "captioned.txt").write_text("my own caption\n")
    _image(src / ".hidden.png", RED, 4)
    return src


def test_tag_writes_captions_by_the_danbooru_caption_rules(folder, model_dir, capsys):
    assert main(["tag", str(folder), "--model", str(model_dir)]) == 0
    # count tag, character, then general tags by probability; meta and rating tags left out;
    # channels read as BGR (a red image is not "blue_background")
    assert (folder / "red.txt").read_text() == "1girl, hatsune miku, red theme, long hair\n"
    assert (folder / "sub" / "blue.txt").read_text() == "1girl, blue background\n"
    assert (folder / "captioned.txt").read_text() == "my own caption\n"  # never touched
    assert not (folder / ".hidden.txt").exists()
    out = capsys.readouterr().out
    assert "tagged 2 image(s)" in out and "1 already had a caption, kept" in out


def test_thresholds_and_overwrite(folder, model_dir, capsys):
    assert main(["tag", str(folder), "--model", str(model_dir), "--general-threshold", "0.6",
                 "--character-threshold", "0.97", "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tagged"] == 3
    assert (folder / "red.txt").read_text() == "1girl, red theme\n"
    assert (folder / "captioned.txt").read_text() == "1girl, red theme\n"


def test_import_then_reads_the_tags(folder, model_dir, tmp_path, capsys):
    assert main(["tag", str(folder), "--model", str(model_dir)]) == 0
    ws = tmp_path / "ws"
    assert main(["import", "--from", str(folder), "--workspace", str(ws), "--min-side", "64"]) == 0
    captions = sorted(p.read_text().strip() for p in (ws / "datasets" / "anime" / "images").glob("*.txt"))
    assert "1girl, hatsune miku, red theme, long hair" in captions
    assert "1girl, blue background" in captions


def test_a_hub_id_is_read_through_the_hugging_face_cache(model_dir, tmp_path, monkeypatch):
    """The Hub path runs offline from a cache laid out as huggingface_hub writes it."""
    from huggingface_hub import constants

    from lora.data.tagger import Tagger

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--SmilingWolf--wd-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    write_model(repo / "snapshots" / revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tagger = Tagger("SmilingWolf/wd-test")
    probs = tagger.probabilities([Image.new("RGB", (50, 80), BLUE)])  # padded white, resized
    assert tagger.side == 32 and probs.shape == (1, len(TAGS))
    assert "blue_background" in tagger.tagset(probs[0]).general
    from lora.data.tagger import TaggerDownloadError

    with pytest.raises(TaggerDownloadError, match="cannot download"):  # offline: a runtime failure
        Tagger("SmilingWolf/not-cached")


def test_without_onnxruntime_the_error_names_the_extra(folder, model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    assert main(["tag", str(folder), "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'animelora[tagger]'" in err
    assert not (folder / "red.txt").exists()


@pytest.mark.parametrize("csv_text, problem", [
    ("id,tag\n1,x\n", "expected the header tag_id,name,category,count"),
    ("tag_id,name,category,count\n1,x,notanumber,0\n", "line 2"),
])
def test_a_bad_tag_list_is_one_line_exit_2(folder, model_dir, tmp_path, csv_text, problem, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    (bad / "selected_tags.csv").write_text(csv_text)
    assert main(["tag", str(folder), "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err


def test_help_defaults_match_the_library():
    from animelora.commands import tag
    from lora.data import tagger

    assert tag._DEFAULT_MODEL_HELP == tagger.DEFAULT_MODEL
    assert tag._GENERAL_HELP == tagger.DEFAULT_GENERAL_THRESHOLD
    assert tag._CHARACTER_HELP == tagger.DEFAULT_CHARACTER_THRESHOLD
