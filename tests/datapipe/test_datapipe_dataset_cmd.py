"""Issue 23, hand edits of a data set: a version never lists a file that is not there, and
`animelora dataset check | repair | remove | restore` find and mend what a hand edit broke."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from animelora.cli import main as cli
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.versions import VersionError, list_versions, read_version


def _training_reader():
    """Training's data-set reader, imported when a test needs it (the data tests load without
    torch); it lives in lora.train.data.dataset, lora.train.dataset before that move."""
    try:
        from lora.train.data import dataset
    except ModuleNotFoundError:
        from lora.train import dataset  # type: ignore[no-redef]
    return dataset


def read_dataset(root: Path):
    """What training reads of a data set: ``(version, items)``."""
    return _training_reader().read_dataset(root)


def _training_error():
    return _training_reader().DatasetError


def _folder(root: Path, img, seeds: range) -> Path:
    for seed in seeds:
        img.save(root / f"p{seed}.png", seed)
        (root / f"p{seed}.txt").write_text(f"tag{seed}, smile\n", encoding="utf-8")
    return root


def _import(src: Path, workspace: Path) -> int:
    return cli(["import", "--from", str(src), "--workspace", str(workspace), "--dataset", "d"])


def _dataset(*args: str, workspace: Path) -> int:
    return cli(["dataset", args[0], "--workspace", str(workspace), "--dataset", "d", *args[1:]])


@pytest.fixture()
def imported(workspace, tmp_path, img, capsys):
    """A data set ``d`` of 3 captioned images (v0001), and its paths and rows by source file."""
    src = _folder(tmp_path / "src", img, range(1, 4))
    assert _import(src, workspace) == 0
    capsys.readouterr()
    paths = DatasetPaths.of(workspace, "d")
    rows = {r.source.removeprefix("file:").removesuffix(".png"): r for r in load_manifest(paths).itertuples()}
    return paths, rows, src


def _files_exist(paths: DatasetPaths, version: str | None = None) -> bool:
    return all((paths.root / f).is_file() for f in read_version(paths, version)["files"])


def test_an_image_deleted_by_hand_is_not_listed_by_the_next_import(imported, tmp_path, img, workspace, capsys):
    paths, rows, _ = imported
    (paths.root / rows["p2"].file).unlink()
    assert _import(_folder(tmp_path / "more", img, range(10, 11)), workspace) == 0
    out = capsys.readouterr().out
    # v0002 records the deletion (the import found it before adding), v0003 adds the new image
    version = read_version(paths)
    assert version["version"] == "v0003" and version["count"] == 3 and _files_exist(paths)
    assert _files_exist(paths, "v0002") and read_version(paths, "v0002")["reason"] == "file-missing"
    assert rows["p2"].file not in version["files"]
    row = load_manifest(paths).set_index("id").loc[rows["p2"].id]
    assert (row.status, row.reason) == ("removed", "file-missing")
    assert "missing" in out and rows["p2"].id in out
    assert len(read_dataset(paths.root)[1]) == 3          # the latest version trains


def test_check_lists_hand_edits_and_repair_records_them(imported, workspace, capsys):
    paths, rows, _ = imported
    (paths.root / rows["p1"].file).unlink()
    caption = (paths.root / rows["p3"].file).with_suffix(".txt")
    caption.write_text("tag3, frown\nnight sky\n", encoding="utf-8")   # edited, two lines

    assert _dataset("check", workspace=workspace) == 1
    out = capsys.readouterr().out
    assert str(paths.root / rows["p1"].file) in out and "missing" in out
    assert str(caption) in out and "caption" in out
    assert list_versions(paths) == ["v0001"]                     # check writes nothing

    assert _dataset("repair", workspace=workspace) == 0
    out = capsys.readouterr().out
    assert "v0002" in out
    version = read_version(paths)
    assert version["count"] == 2 and _files_exist(paths)
    df = load_manifest(paths).set_index("id")
    assert (df.loc[rows["p1"].id, "status"], df.loc[rows["p1"].id, "reason"]) == ("removed", "file-missing")
    assert df.loc[rows["p3"].id, "caption"] == "tag3, frown, night sky"
    assert caption.read_text(encoding="utf-8") == "tag3, frown, night sky\n"   # one line now
    _, items = read_dataset(paths.root)
    assert {i.caption for i in items} == {"tag2, smile", "tag3, frown, night sky"}

    assert _dataset("check", workspace=workspace) == 0
    assert _dataset("repair", workspace=workspace) == 0 and list_versions(paths) == ["v0001", "v0002"]


def test_remove_writes_a_version_without_the_image_and_restore_brings_it_back(imported, workspace, capsys):
    paths, rows, src = imported
    gone = rows["p2"]
    assert _dataset("remove", gone.id, "--reason", "blurry", workspace=workspace) == 0
    version = read_version(paths)
    assert version["version"] == "v0002" and gone.file not in version["files"] and _files_exist(paths)
    assert _files_exist(paths, "v0001") and gone.file in read_version(paths, "v0001")["files"]
    row = load_manifest(paths).set_index("id").loc[gone.id]
    assert (row.status, row.reason) == ("removed", "removed-by-user:blurry")
    capsys.readouterr()

    # importing the same folder again does not bring it back ...
    assert _import(src, workspace) == 0
    assert "kept 0" in capsys.readouterr().out and list_versions(paths) == ["v0001", "v0002"]
    # ... restore does (by file name as well as by id)
    assert _dataset("restore", Path(gone.file).name, workspace=workspace) == 0
    version = read_version(paths)
    assert version["version"] == "v0003" and gone.file in version["files"] and version["count"] == 3
    assert _dataset("check", workspace=workspace) == 0


def test_remove_refuses_unknown_ids_before_any_work(imported, workspace, capsys):
    paths, rows, _ = imported
    assert _dataset("remove", rows["p1"].id, "nope-123", workspace=workspace) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope-123" in err
    assert list_versions(paths) == ["v0001"]
    assert (load_manifest(paths).status == "kept").sum() == 3


def test_restore_of_a_missing_file_lets_the_next_import_bring_it_back(imported, workspace, capsys):
    paths, rows, src = imported
    (paths.root / rows["p1"].file).unlink()
    assert _dataset("repair", workspace=workspace) == 0
    assert _dataset("restore", rows["p1"].id, workspace=workspace) == 0
    assert "import" in capsys.readouterr().out          # says how it comes back
    assert _import(src, workspace) == 0
    assert read_version(paths)["count"] == 3 and _files_exist(paths)


def test_version_paths_outside_the_data_set_are_refused(imported, workspace, capsys):
    paths, _, _ = imported
    data = read_version(paths)
    for i, bad in enumerate(("../../etc/passwd", "/etc/passwd")):
        data.update(version=f"v000{i + 2}", files=[data["files"][0], bad], count=2)
        (paths.versions / f"v000{i + 2}.json").write_text(json.dumps(data))
        with pytest.raises(VersionError, match=r"files\[1\]"):
            read_version(paths)
        with pytest.raises(_training_error()) as exc:
            read_dataset(paths.root)
        assert f"v000{i + 2}.json" in str(exc.value) and bad in str(exc.value) and "\n" not in str(exc.value)
        assert _dataset("check", workspace=workspace) == 1
        assert bad in capsys.readouterr().out
        (paths.versions / f"v000{i + 2}.json").unlink()


def test_a_version_that_is_not_json_is_reported_and_repair_supersedes_it(imported, workspace, capsys):
    paths, _, _ = imported
    (paths.versions / "v0002.json").write_text("{truncated")
    assert _dataset("check", workspace=workspace) == 1
    assert "v0002.json" in capsys.readouterr().out
    assert _dataset("repair", workspace=workspace) == 0
    assert read_version(paths)["version"] == "v0003" and _files_exist(paths)
    assert _dataset("check", workspace=workspace) == 0


def test_a_fetch_does_not_bring_a_removed_post_back_until_it_is_restored(booru_factory, workspace, capsys, monkeypatch):
    from lora.testing.fakebooru import generate_posts

    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    server = booru_factory(generate_posts(4, seed=7, traps=False))
    fetch = ["fetch", "--booru-url", server.url, "--workspace", str(workspace), "--dataset", "d",
             "--requests-per-second", "10", "--ratings", "g,s,q,e", "--tags", "status:any", "--json"]
    assert cli(fetch) == 0 and json.loads(capsys.readouterr().out)["total_kept"] == 4
    paths = DatasetPaths.of(workspace, "d")
    row = load_manifest(paths).iloc[0]
    (paths.root / row.file).unlink()                     # deleted by hand ...
    assert _dataset("repair", workspace=workspace) == 0  # ... and recorded
    capsys.readouterr()
    assert cli(fetch) == 0
    assert json.loads(capsys.readouterr().out)["total_kept"] == 3 and read_version(paths)["count"] == 3

    assert _dataset("restore", row.id, workspace=workspace) == 0
    capsys.readouterr()
    assert cli(fetch) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 1 and summary["total_kept"] == 4
    assert (paths.root / row.file).is_file() and _files_exist(paths) and read_version(paths)["count"] == 4


def test_a_fetch_after_a_hand_deletion_writes_a_version_of_files_that_are_there(booru_factory, workspace, capsys, monkeypatch):
    from lora.testing.fakebooru import generate_posts

    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    server = booru_factory(generate_posts(6, seed=8, traps=False))
    fetch = ["fetch", "--booru-url", server.url, "--workspace", str(workspace), "--dataset", "d",
             "--requests-per-second", "10", "--ratings", "g,s,q,e", "--tags", "status:any", "--json"]
    assert cli([*fetch, "--limit", "4"]) == 0
    capsys.readouterr()
    paths = DatasetPaths.of(workspace, "d")
    (paths.root / load_manifest(paths).file.iloc[0]).unlink()
    assert cli(fetch) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 2 and summary["total_kept"] == 5
    assert read_version(paths)["count"] == 5 and _files_exist(paths)


def test_a_manifest_row_naming_a_file_outside_the_data_set_is_refused(imported, workspace, tmp_path, img, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lora.data.manifest import COLUMNS, SCHEMA, load_rows

    paths, _, _ = imported
    rows = load_rows(paths)
    rows[0]["file"] = "../../../etc/passwd"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows], schema=SCHEMA),
                   str(paths.manifest))
    before = sorted(p.name for p in paths.versions.iterdir())
    assert _dataset("check", workspace=workspace) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.parquet" in err and "../../../etc/passwd" in err
    assert _import(_folder(tmp_path / "more", img, range(20, 21)), workspace) == 2
    assert "../../../etc/passwd" in capsys.readouterr().err
    assert sorted(p.name for p in paths.versions.iterdir()) == before


def test_kept_images_without_any_version_are_reported_and_repaired(imported, workspace, capsys):
    paths, _, _ = imported
    (paths.versions / "v0001.json").unlink()            # e.g. deleted by hand
    assert _dataset("check", workspace=workspace) == 1
    assert "no version lists them" in capsys.readouterr().out
    assert _dataset("repair", workspace=workspace) == 0
    assert read_version(paths)["count"] == 3 and _dataset("check", workspace=workspace) == 0


def test_re_importing_mends_a_data_set_a_hand_deletion_left_untrainable(imported, workspace, capsys):
    paths, rows, src = imported
    (paths.root / rows["p1"].file).unlink()
    assert _import(src, workspace) == 0                   # nothing new to import ...
    out = capsys.readouterr().out
    assert "version: v0002" in out and "missing" in out   # ... but the hand deletion is recorded
    assert read_version(paths)["count"] == 2 and _files_exist(paths)
    assert _dataset("check", workspace=workspace) == 0
