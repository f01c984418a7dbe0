"""Duplicate groups keep the best copy and its caption; import refuses what a user did not mean.

- byte-identical copies: the captioned one is kept, whatever sorts first;
- near copies: lossless over lossy, larger over smaller, then the earlier; the kept copy
  inherits a caption from a copy that has one;
- a better copy in a later import replaces the kept one for new versions, and the older file
  stays for the versions that list it;
- symlinks out of the source folder, hidden files, empty folders, an empty source and the
  data set's own folder are refused or reported.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from animelora.cli import main as cli
from lora.data.importer import FolderImportError, import_folder
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.refresh import recover
from lora.data.versions import read_version


def _jpeg_copy(src: Path, dest: Path, scale: float = 1.0) -> Path:
    im = Image.open(src).convert("RGB")
    if scale != 1.0:
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())
    return dest


def _caption(paths: DatasetPaths, row) -> str:
    return (paths.root / row.file).with_suffix(".txt").read_text().strip()


def test_a_captioned_copy_keeps_its_caption_when_an_uncaptioned_copy_sorts_first(workspace, tmp_path, img):
    src = tmp_path / "src"
    img.save(src / "b.png", 1)
    shutil.copy(src / "b.png", src / "a.png")          # byte-identical, sorts first, no caption
    (src / "b.txt").write_text("1girl, red hair\n")

    summary = import_folder(workspace, "cap", src)
    paths = DatasetPaths.of(workspace, "cap")
    df = load_manifest(paths)
    kept = df[df.status == "kept"]
    assert summary.kept == 1 and len(kept) == 1
    assert kept.source.item() == "file:b.png"
    assert _caption(paths, kept.iloc[0]) == "1girl, red hair"
    dup = df[df.source == "file:a.png"].iloc[0]
    assert dup.status == "duplicate" and dup.duplicate_of == kept.id.item()


def test_near_copies_keep_the_lossless_larger_one_and_inherit_the_caption(workspace, tmp_path, img):
    src = tmp_path / "src"
    original = img.save(tmp_path / "orig" / "z_original.png", 2, size=(768, 768))
    src.mkdir()
    shutil.copy(original, src / "z_original.png")                    # lossless, larger, no caption
    _jpeg_copy(original, src / "a_reencode.jpg", scale=0.8)          # lossy, smaller, sorts first
    (src / "a_reencode.txt").write_text("1girl, smile\n")
    img.save(src / "other.png", 3)

    summary = import_folder(workspace, "near", src)
    paths = DatasetPaths.of(workspace, "near")
    df = load_manifest(paths).set_index("source")
    assert summary.kept == 2 and summary.duplicates == 1
    best = df.loc["file:z_original.png"]
    assert best.status == "kept" and best.width == 768
    assert _caption(paths, best) == "1girl, smile" and best.caption == "1girl, smile"
    worse = df.loc["file:a_reencode.jpg"]
    assert worse.status == "duplicate" and worse.duplicate_of == best.id
    assert worse.reason == f"duplicate-of:{best.id}"
    assert sorted(read_version(paths)["files"]) == sorted(df[df.status == "kept"].file)
    # nothing of the worse copy reached images/
    assert sorted(p.name for p in paths.images.iterdir()) == sorted(
        n for f in df[df.status == "kept"].file for n in (Path(f).name, Path(f).with_suffix(".txt").name))


def test_a_better_copy_later_replaces_the_kept_one_for_new_versions_only(workspace, tmp_path, img):
    original = img.save(tmp_path / "keep" / "pic.png", 4, size=(768, 768))
    first = tmp_path / "first"
    _jpeg_copy(original, first / "pic.jpg", scale=0.8)
    img.save(first / "other.png", 5)
    (first / "pic.txt").write_text("1girl, hat\n")
    import_folder(workspace, "grow", first)
    paths = DatasetPaths.of(workspace, "grow")
    v1 = read_version(paths, "v0001")
    old = load_manifest(paths).set_index("source").loc["file:pic.jpg"]

    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(original, second / "pic.png")
    summary = import_folder(workspace, "grow", second)
    assert summary.kept == 1 and summary.replaced == 1 and summary.version == "v0002"
    assert "replaced 1 earlier image" in summary.format_table()

    df = load_manifest(paths).set_index("source")
    new, before = df.loc["file:pic.png"], df.loc["file:pic.jpg"]
    assert new.status == "kept" and _caption(paths, new) == "1girl, hat"      # inherited
    assert before.status == "duplicate" and before.duplicate_of == new.id
    assert before.file == old.file and before.version_added == "v0001"
    v2 = read_version(paths, "v0002")
    assert new.file in v2["files"] and old.file not in v2["files"] and v2["count"] == 2
    # the old version still trains exactly as before: same list, files and captions on disk
    assert read_version(paths, "v0001") == v1
    assert all((paths.root / f).exists() and (paths.root / f).with_suffix(".txt").exists() for f in v1["files"])
    recover(paths)                                            # not an orphan to clean up
    assert (paths.root / old.file).exists()


def test_symlinks_out_of_the_source_are_refused_unless_asked(workspace, tmp_path, img, capsys):
    outside = tmp_path / "outside"
    img.save(outside / "secret.png", 6)
    img.save(outside / "dir" / "deep.png", 7)
    src = tmp_path / "src"
    img.save(src / "mine.png", 8)
    os.symlink(outside / "secret.png", src / "link.png")
    os.symlink(outside / "dir", src / "linked_dir")
    (src / ".hidden.png").write_bytes((src / "mine.png").read_bytes())
    (src / "empty").mkdir()

    rc = cli(["import", "--from", str(src), "--workspace", str(workspace), "--dataset", "sym"])
    out = capsys.readouterr().out
    assert rc == 0
    df = load_manifest(DatasetPaths.of(workspace, "sym"))
    assert list(df.source) == ["file:mine.png"]
    assert "refused 2 symlink(s)" in out and "--follow-symlinks" in out
    assert "skipped 1 hidden" in out and "1 empty folder(s): empty/" in out

    rc = cli(["import", "--from", str(src), "--workspace", str(workspace), "--dataset", "sym",
              "--follow-symlinks"])
    assert rc == 0
    df = load_manifest(DatasetPaths.of(workspace, "sym"))
    assert sorted(df.source) == ["file:link.png", "file:linked_dir/deep.png", "file:mine.png"]


def test_an_empty_source_and_the_data_set_itself_are_refused(workspace, tmp_path, img, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / ".DS_Store").write_text("x")
    with pytest.raises(FolderImportError, match="no images to import.*hidden"):
        import_folder(workspace, "e", empty)

    src = tmp_path / "src"
    img.save(src / "a.png", 9)
    import_folder(workspace, "self", src)
    paths = DatasetPaths.of(workspace, "self")
    before = load_manifest(paths)
    for folder in (paths.images, paths.root, workspace):
        rc = cli(["import", "--from", str(folder), "--workspace", str(workspace), "--dataset", "self"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "self" in err
    assert load_manifest(paths).equals(before)


def test_a_caption_arriving_later_with_a_byte_identical_copy_is_not_lost(workspace, tmp_path, img):
    first = tmp_path / "first"
    img.save(first / "x.png", 10)
    import_folder(workspace, "late", first)
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(first / "x.png", second / "x_again.png")
    (second / "x_again.txt").write_text("1boy, sketch\n")

    summary = import_folder(workspace, "late", second)
    paths = DatasetPaths.of(workspace, "late")
    df = load_manifest(paths).set_index("source")
    new, old = df.loc["file:x_again.png"], df.loc["file:x.png"]
    assert summary.replaced == 1 and new.status == "kept" and _caption(paths, new) == "1boy, sketch"
    assert old.status == "duplicate" and old.reason == f"md5-duplicate-of:{new.id}"
    assert (paths.root / old.file).exists() and read_version(paths, "v0001")["files"] == [old.file]
