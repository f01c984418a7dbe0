"""`animelora import`: plain folders and the old downloader's layout go through dedup,
captioning and preparation, and produce a version."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


from animelora.cli import main as cli
from lora.data.importer import import_folder
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.versions import list_versions, read_version


def test_import_plain_folder_dedups_captions_and_versions(workspace, tmp_path, img):
    src = tmp_path / "mine"
    a = img.save(src / "a.png", 1)
    (src / "a.txt").write_text("1girl, red hair, smile\n")
    img.save(src / "b.jpg", 2, fmt="JPEG")
    shutil.copy(a, src / "a_copy.png")                     # byte-identical
    img.near_copy(a, src / "sub" / "a_small_jpeg.jpg")         # re-encoded, resized
    img.save(src / "tiny.png", 3, size=(200, 300))       # too small
    (src / "notes.txt").write_text("not an image")

    summary = import_folder(workspace, "mine", src, trigger_word="myst")
    assert (summary.kept, summary.duplicates, summary.rejected) == (2, 2, 1)
    assert summary.reasons == {"md5-duplicate-of": 1, "duplicate-of": 1, "too-small": 1}
    assert summary.version == "v0001" and summary.total_kept == 2

    paths = DatasetPaths.of(workspace, "mine")
    df = load_manifest(paths)
    kept = df[df.status == "kept"]
    version = read_version(paths, "v0001")
    assert sorted(version["files"]) == sorted(kept.file)
    for rel in version["files"]:
        assert (paths.root / rel).exists()
    captions = {Path(f).stem: (paths.root / f).with_suffix(".txt").read_text().strip() for f in kept.file}
    a_id = kept[kept.source == "file:a.png"].id.item()
    b_id = kept[kept.source == "file:b.jpg"].id.item()
    assert captions[a_id] == "myst, 1girl, red hair, smile"
    assert captions[b_id] == "myst"
    dups = df[df.status == "duplicate"].set_index("source")
    assert dups.loc["file:a_copy.png", "duplicate_of"] == a_id
    assert dups.loc["file:sub/a_small_jpeg.jpg", "duplicate_of"] == a_id

    again = import_folder(workspace, "mine", src, trigger_word="myst")
    assert again.kept == 0 and again.version is None and again.already_seen == 5
    assert list_versions(paths) == ["v0001"]
    assert len(load_manifest(paths)) == 5


def test_import_old_downloader_layout(workspace, tmp_path, img, capsys):
    src = tmp_path / "old"
    img.save(src / "sketch" / "img_001.png", 10)
    img.save(src / "sketch" / "img_002.png", 11)
    img.save(src / "landscape" / "img_003.png", 12, size=(768, 512))
    img.save(src / "landscape" / "extra.png", 13)  # not in metadata.json
    meta = {"training_data": [
        {"file": "img_001.png", "style": "sketch", "tags": "1girl solo monochrome sketch highres",
         "width": 640, "height": 640, "danbooru_id": 5001},
        {"file": "sketch/img_002.png", "style": "sketch", "tags": "1boy, sketch, greyscale",
         "width": 640, "height": 640, "danbooru_id": 5002},
        {"file": "img_003.png", "style": "landscape", "tags": "scenery no_humans cloud",
         "width": 768, "height": 512, "danbooru_id": 5003},
        {"file": "gone.png", "style": "landscape", "tags": "sky", "width": 1, "height": 1,
         "danbooru_id": 5004},
    ]}
    (src / "metadata.json").write_text(json.dumps(meta))

    rc = cli(["import", "--from", str(src), "--workspace", str(workspace), "--dataset", "old",
              "--trigger-word", "oldstyle"])
    assert rc == 0
    paths = DatasetPaths.of(workspace, "old")
    df = load_manifest(paths).set_index("id")
    assert df.loc["5001", "query"] == "sketch" and df.loc["5003", "query"] == "landscape"
    assert df.loc["5001", "post_id"] == 5001
    # a listed file that is missing is skipped, not recorded: it comes in once it is there
    assert "5004" not in df.index
    assert "training_data[3] (gone.png): file-not-found" in capsys.readouterr().out
    assert (df.status == "kept").sum() == 4  # three listed + the unlisted extra.png
    extra = df[df.source == "file:landscape/extra.png"]
    assert extra["query"].item() == "landscape"
    cap = (paths.root / df.loc["5001", "file"]).with_suffix(".txt").read_text().strip()
    assert cap == "oldstyle, 1girl, solo, monochrome, sketch"   # meta tag highres dropped
    cap2 = (paths.root / df.loc["5002", "file"]).with_suffix(".txt").read_text().strip()
    assert cap2 == "oldstyle, 1boy, sketch, greyscale"
    version = read_version(paths)
    assert version["version"] == "v0001" and version["count"] == 4
    assert 5001 in version["post_ids"]
    assert set(version["queries"]) == {"sketch", "landscape"}


def test_import_errors_are_one_line(workspace, tmp_path, capsys):
    rc = cli(["import", "--from", str(tmp_path / "missing"), "--workspace", str(workspace),
              "--dataset", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.json").write_text("{not json")
    rc = cli(["import", "--from", str(bad), "--workspace", str(workspace), "--dataset", "x"])
    assert rc == 2 and "metadata.json" in capsys.readouterr().err
