"""`animelora import` with imperfect input (issue 23): one bad caption, metadata entry or id
is skipped with the user's own path and a reason, the rest of the import goes on; caption
options apply to ``.txt`` captions too; a path in metadata.json that leads out of the source
folder refuses the import before any work."""
from __future__ import annotations

import json
import re
from pathlib import Path

from animelora.cli import main as cli
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.versions import read_version


def _import(src: Path, workspace: Path, *extra: str) -> int:
    return cli(["import", "--from", str(src), "--workspace", str(workspace), "--dataset", "d", *extra])


def _captions(workspace: Path) -> dict[str, str]:
    """``{source file: caption file text}`` of the kept images."""
    paths = DatasetPaths.of(workspace, "d")
    df = load_manifest(paths)
    kept = df[df.status == "kept"]
    return {src.removeprefix("file:"): (paths.root / f).with_suffix(".txt").read_text(encoding="utf-8").strip()
            for src, f in zip(kept.source, kept.file)}


def _json_summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------------------
# case 11: --blacklist/--max-tags on .txt captions, a BOM, a commas-only caption
# ----------------------------------------------------------------------------------------


def test_caption_options_apply_to_txt_captions(workspace, tmp_path, img):
    src = tmp_path / "mine"
    img.save(src / "a.png", 1)
    (src / "a.txt").write_text("1girl, long_hair, smile, red eyes, smile, outdoors\n", encoding="utf-8")
    img.save(src / "b.png", 2)
    (src / "b.txt").write_text("myst, solo, watermark, sky\n", encoding="utf-8")

    rc = _import(src, workspace, "--blacklist", "long hair,watermark", "--max-tags", "2",
                 "--trigger-word", "myst")
    assert rc == 0
    captions = _captions(workspace)
    # blacklist matches with or without underscores, repeats go, at most 2 tags after the trigger
    assert captions["a.png"] == "myst, 1girl, smile"
    assert captions["b.png"] == "myst, solo, sky"


def test_bom_and_commas_only_captions(workspace, tmp_path, img):
    src = tmp_path / "mine"
    img.save(src / "a.png", 1)
    (src / "a.txt").write_bytes("\ufeff1girl, smile\n".encode("utf-8"))
    img.save(src / "b.png", 2)
    (src / "b.txt").write_text(" , ,, \n", encoding="utf-8")

    assert _import(src, workspace, "--blacklist", "1girl") == 0
    captions = _captions(workspace)
    assert captions["a.png"] == "smile"          # the BOM is not part of the first tag
    assert captions["b.png"] == ""               # commas only: no caption
    df = load_manifest(DatasetPaths.of(workspace, "d")).set_index("source")
    assert df.loc["file:a.png", "tags_general"] == "smile"
    assert not df.loc["file:b.png", "caption"]


# ----------------------------------------------------------------------------------------
# case 7: a caption with two lines, in Latin-1, or not text at all
# ----------------------------------------------------------------------------------------


def test_bad_captions_do_not_abort_the_import(workspace, tmp_path, img, capsys):
    src = tmp_path / "mine"
    for i, name in enumerate(("two_lines", "latin1", "binary", "good")):
        img.save(src / f"{name}.png", 10 + i)
    (src / "two_lines.txt").write_text("1girl, smile\nouter space, stars\n", encoding="utf-8")
    (src / "latin1.txt").write_bytes("café, crème brûlée".encode("latin-1"))
    (src / "binary.txt").write_bytes(b"\x00\x81\x9f\xff\xfe garbage")
    (src / "good.txt").write_text("solo\n", encoding="utf-8")

    assert _import(src, workspace, "--json") == 0
    summary = _json_summary(capsys)
    captions = _captions(workspace)
    assert captions["two_lines.png"] == "1girl, smile, outer space, stars"   # lines joined
    assert captions["latin1.png"] == "café, crème brûlée"                   # read as Latin-1
    assert captions["good.png"] == "solo"
    assert "binary.png" not in captions                                      # skipped, not guessed
    assert summary["kept"] == 3
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert list(skipped) == ["binary.txt"] and skipped["binary.txt"].startswith("caption-not-text")
    assert all(str(src) in s["path"] and ".staging" not in s["path"] for s in summary["skipped"])
    notes = " ".join(summary["notes"])
    assert "two_lines.txt" in notes and "latin1.txt" in notes and ".staging" not in notes

    # the table says the same; the skipped image comes in once its caption is fixed
    (src / "binary.txt").write_text("sky\n", encoding="utf-8")
    assert _import(src, workspace) == 0
    out = capsys.readouterr().out
    assert "kept 1" in out and _captions(workspace)["binary.png"] == "sky"


def test_skipped_caption_is_listed_in_the_table(workspace, tmp_path, img, capsys):
    src = tmp_path / "mine"
    img.save(src / "a.png", 1)
    img.save(src / "b.png", 2)
    (src / "b.txt").write_bytes(b"\x00\x01\x02")
    assert _import(src, workspace) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out and str(src / "b.txt") in out and "caption-not-text" in out


# ----------------------------------------------------------------------------------------
# case 4 and 13: metadata.json entries
# ----------------------------------------------------------------------------------------


def _old_layout(src: Path, img, entries: list) -> None:
    img.save(src / "sketch" / "img_001.png", 1)
    img.save(src / "sketch" / "img_002.png", 2)
    (src / "metadata.json").write_text(json.dumps({"training_data": entries}))


def test_a_danbooru_id_listed_twice_with_one_copy_missing(workspace, tmp_path, img, capsys):
    src = tmp_path / "old"
    _old_layout(src, img, [
        {"file": "gone.png", "style": "sketch", "tags": "1girl", "danbooru_id": 5001},
        {"file": "img_001.png", "style": "sketch", "tags": "1girl smile", "danbooru_id": 5001},
    ])
    assert _import(src, workspace, "--json") == 0
    summary = _json_summary(capsys)
    paths = DatasetPaths.of(workspace, "d")
    df = load_manifest(paths).set_index("id")
    assert df.loc["5001", "status"] == "kept"
    assert summary["total_kept"] == 2 and read_version(paths)["count"] == 2
    assert [(s["reason"], "training_data[0]" in s["path"]) for s in summary["skipped"]] == [
        ("file-not-found", True)]

    # the missing file turns up later: the entry is imported then (it was never recorded as seen)
    img.save(src / "sketch" / "gone.png", 3)
    (src / "metadata.json").write_text(json.dumps({"training_data": [
        {"file": "gone.png", "style": "sketch", "tags": "1girl", "danbooru_id": 5002}]}))
    assert _import(src, workspace, "--json") == 0
    assert _json_summary(capsys)["total_kept"] == 3


def test_bad_metadata_entries_are_skipped_and_the_rest_imported(workspace, tmp_path, img, capsys):
    src = tmp_path / "old"
    _old_layout(src, img, [
        {"file": "img_001.png", "style": "sketch", "tags": "1girl", "danbooru_id": 2**70},
        {"file": "img_002.png", "style": "sketch", "tags": "solo", "danbooru_id": 7},
        "not an entry",
        {"file": 12, "style": "sketch"},
        {"file": "img_002.png", "style": {"a": 1}, "tags": "x", "danbooru_id": 8},
        {"file": "img_002.png", "style": "sketch", "tags": {"a": 1}, "danbooru_id": 9},
        {"file": "img_002.png", "style": "sketch", "tags": "x", "danbooru_id": -3},
    ])
    assert _import(src, workspace, "--json") == 0
    summary = _json_summary(capsys)
    df = load_manifest(DatasetPaths.of(workspace, "d")).set_index("id")
    assert df.loc["7", "status"] == "kept"
    # img_001.png's entry was skipped: the file is imported as a plain image (local id)
    assert (df.status == "kept").sum() == 2 and df.post_id.max() == 7
    reasons = {re.search(r"training_data(\[\d+\])", s["path"]).group(1): s["reason"]
               for s in summary["skipped"]}
    assert reasons["[0]"].startswith("bad-danbooru-id") and reasons["[6]"].startswith("bad-danbooru-id")
    assert set(reasons) == {"[0]", "[2]", "[3]", "[4]", "[5]", "[6]"}
    assert all(str(src / "metadata.json") in s["path"] for s in summary["skipped"])


def test_metadata_path_out_of_the_source_folder_is_refused_before_any_work(workspace, tmp_path, img, capsys):
    for i, bad in enumerate(("../../etc/passwd", "/etc/passwd", "sketch/../../outside.png")):
        src = tmp_path / f"old{i}"
        _old_layout(src, img, [
            {"file": "img_001.png", "style": "sketch", "tags": "1girl", "danbooru_id": 1},
            {"file": bad, "style": "sketch", "tags": "1girl", "danbooru_id": 2},
        ])
        rc = _import(src, workspace)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "metadata.json" in err and "training_data[1]" in err and bad in err
        assert not (workspace / "datasets" / "d").exists()


def test_a_caption_symlink_out_of_the_source_folder_is_not_read(workspace, tmp_path, img, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("api key 12345\n", encoding="utf-8")
    src = tmp_path / "mine"
    img.save(src / "a.png", 1)
    (src / "a.txt").symlink_to(secret)
    img.save(src / "b.png", 2)
    assert _import(src, workspace, "--json") == 0
    summary = _json_summary(capsys)
    assert summary["kept"] == 1 and "a.png" not in _captions(workspace)
    assert [Path(s["path"]).name for s in summary["skipped"]] == ["a.txt"]
    assert "12345" not in json.dumps(summary)
