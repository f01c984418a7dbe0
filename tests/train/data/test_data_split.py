"""The held-out split belongs to the data set: every seed, preset and version holds out the same
images, a grown data set adds held-out images at the same rate, and old runs keep their split."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from lora.data.manifest import DatasetPaths, load_rows
from lora.data.refresh import QuerySpec, refresh_dataset
from lora.data.split import SPLIT_FILE, VALIDATION
from lora.testing.fakebooru import FakeDanbooru, generate_posts
from lora.train import train
from lora.train.data.plan import make_plan


def _fetch(ws, server, target):
    return refresh_dataset(ws, "grow", [QuerySpec("default", "1girl")], booru_url=server.url,
                           target_size=target, ratings=("g", "s", "q", "e"), requests_per_second=10,
                           backoff_base=0.01)


def _config(dataset, **extra):
    from lora.config import resolve_config

    values = {"model": "tiny", "dataset": str(dataset), "max_steps": 1, "checkpoint_every_minutes": None}
    values.update(extra)
    return resolve_config("phase2a", values, None)


def test_seeds_share_held_out_images_and_growth_never_trains_on_them(tmp_path, tiny_model):
    ws = tmp_path / "ws"
    with FakeDanbooru(generate_posts(100, seed=5, traps=False)) as server:
        _fetch(ws, server, 20)
        paths = DatasetPaths.of(ws, "grow")
        runs = {}
        for seed in (1, 2):
            run = tmp_path / f"seed{seed}"
            assert train(_config(paths.root, seed=seed, run_name=f"seed{seed}"), run).complete
            runs[seed] = json.loads((run / "config.json").read_text())
        held_v1 = set(runs[1]["held_out_images"])
        assert held_v1 and held_v1 == set(runs[2]["held_out_images"])
        assert runs[1]["validation_images"] == runs[2]["validation_images"]
        assert runs[1]["dataset_version"] == "v0001"

        _fetch(ws, server, 40)  # a refresh grows the data set: v0002
    rows = [r for r in load_rows(paths) if r["status"] == "kept"]
    assert len(rows) >= 30 and "split" in pq.read_schema(paths.manifest).names
    held_rows = {r["file"] for r in rows if r["split"] == VALIDATION}
    assert held_v1 <= held_rows  # nothing held out in v1 moved into training
    assert len(held_rows) == round(len(rows) * 0.1)  # new images joined at the same rate
    assert len(held_rows) > len(held_v1)

    for seed, preset in ((3, "phase2a"), (4, "phase1.5")):
        plan = make_plan(_config(paths.root, seed=seed, preset=preset))
        assert plan.version == "v0002"
        trained = {i.name for i in plan.train_items}
        assert not (trained & held_rows) and {i.name for i in plan.held_out_items} == held_rows
        assert {i.name for i in plan.val_items} == held_rows

    # the v1 run resumes on its own split (pinned version, recorded held-out list)
    resumed = train(_config(paths.root, seed=1, run_name="seed1", max_steps=2), tmp_path / "seed1", extend=True)
    assert resumed.complete and resumed.global_step == 2
    assert set(json.loads((tmp_path / "seed1" / "config.json").read_text())["held_out_images"]) == held_v1


def test_folder_without_manifest_records_its_split(tmp_path):
    from lora.testing.datasets import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "d", 20, [(64, 64)])
    first = make_plan(_config(root, seed=1))
    recorded = json.loads((root / SPLIT_FILE).read_text())
    assert len(first.held_out_items) == 2 and set(recorded["assigned"]) == {
        i.name for i in first.train_items + first.held_out_items}
    again = make_plan(_config(root, seed=99, preset="phase1.5"))
    assert [i.name for i in again.held_out_items] == [i.name for i in first.held_out_items]


def test_old_runs_and_old_manifests_keep_their_split(tmp_path):
    from lora.data.manifest import new_row, save_rows
    from lora.testing.datasets import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "d", 12, [(64, 64)])
    old_run = tmp_path / "old-run"
    old_run.mkdir()
    # a run made before the data set owned the split: only its validation list is recorded
    (old_run / "config.json").write_text(json.dumps({"validation_images": ["images/105.png"]}))
    plan = make_plan(_config(root), run_dir=old_run)
    assert [i.name for i in plan.val_items] == ["images/105.png"]
    assert len(plan.train_items) == 11 and "images/105.png" not in {i.name for i in plan.train_items}

    # a manifest written without the split column: sides are assigned by version_added, the same
    # way in memory (a run) as when a later write records them
    paths = DatasetPaths(tmp_path / "m")
    rows = [new_row(str(i), "kept", file=f"images/{i}.png", version_added="v0001") for i in range(30)]
    import pyarrow as pa

    paths.root.mkdir()
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "split"} for r in rows])
    pq.write_table(table, str(paths.manifest))
    from lora.data.manifest import manifest_splits

    in_memory = manifest_splits(paths.root)
    assert sum(v == VALIDATION for v in in_memory.values()) == 3
    save_rows(paths, load_rows(paths))
    assert {r["file"]: r["split"] for r in load_rows(paths)} == in_memory
