"""Fetching into a data set against the loopback Danbooru: traps, dedup, captions, versions."""
from __future__ import annotations

import json

from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.versions import list_versions, read_version
from lora.testing.fakebooru import generate_posts


def _files_fetched(server):
    return [r.path for r in server.requests if r.path.startswith("/data/")]


def _caption_order_ok(caption: str, post, trigger: str) -> None:
    tags = [t.strip() for t in caption.split(",")]
    assert tags[0] == trigger
    norm = lambda t: t if len(t) <= 3 else t.replace("_", " ")  # noqa: E731
    pos = {t: i for i, t in enumerate(tags)}
    counts = [pos[norm(t)] for t in post.tags_general if t in ("1girl", "1boy", "2girls", "multiple_girls", "no_humans", "solo")]
    chars = [pos[norm(t)] for t in post.tags_character]
    copys = [pos[norm(t)] for t in post.tags_copyright]
    general = [pos[norm(t)] for t in post.tags_general if norm(t) in pos and pos[norm(t)] not in counts]
    for before, after in ((counts, chars), (chars, copys), (copys, general), (counts, general)):
        if before and after:
            assert max(before) < min(after), caption
    for tag in post.tags_meta + post.tags_artist:
        assert norm(tag) not in pos, caption


def test_fetch_keeps_good_posts_and_records_every_trap(booru_factory, fetch, workspace):
    posts = generate_posts(40, seed=0)
    server = booru_factory(posts)
    summary = fetch(server, trigger_word="mystyle")

    paths = DatasetPaths.of(workspace, "d")
    df = load_manifest(paths).set_index("id")
    by_trap = {p.trap: p for p in posts if p.trap}
    expected = {
        "deleted": ("rejected", "deleted"),
        "banned": ("rejected", "banned"),
        "no-file-url": ("rejected", "no-file-url"),
        "video-mp4": ("rejected", "not-an-image:mp4"),
        "video-webm": ("rejected", "not-an-image:webm"),
        "ugoira-zip": ("rejected", "not-an-image:zip"),
        "corrupt": ("rejected", "corrupt"),
        "truncated": ("rejected", "truncated"),
        "md5-mismatch": ("failed", "md5-mismatch"),
        "dup-exact": ("duplicate", f"md5-duplicate-of:{by_trap['dup-exact'].duplicate_of}"),
        "near-reencode": ("duplicate", f"duplicate-of:{by_trap['near-reencode'].duplicate_of}"),
        "near-resize": ("duplicate", f"duplicate-of:{by_trap['near-resize'].duplicate_of}"),
        "rgba": ("kept", None), "palette": ("kept", None), "cmyk": ("kept", None),
        "animated-gif": ("kept", "animated-first-frame"),
    }
    for trap, (status, reason) in expected.items():
        row = df.loc[str(by_trap[trap].id)]
        assert (row.status, row.reason if isinstance(row.reason, str) else None) == (status, reason), trap
    # The query asks for width/height >= 512: the small post never even reaches us.
    assert str(by_trap["small"].id) not in df.index
    normal = [p for p in posts if p.trap is None]
    assert all(df.loc[str(p.id), "status"] == "kept" for p in normal)

    fetched = _files_fetched(server)
    for trap in ("dup-exact", "deleted", "banned", "video-mp4", "ugoira-zip", "small"):
        assert not any(path.startswith(f"/data/{by_trap[trap].id}.") for path in fetched), trap

    kept = df[df.status == "kept"]
    assert summary.kept == len(kept) == len(normal) + 4
    assert summary.duplicates == 3 and summary.failed == 1
    assert summary.reasons["not-an-image"] == 3 and summary.reasons["duplicate-of"] == 2
    table = summary.format_table()
    assert "md5-mismatch" in table and "not-an-image" in table and "v0001" in table

    # Captions: trigger word, counts, characters, copyrights, general; no meta/artist tags.
    for p in normal[:8]:
        caption = (paths.root / df.loc[str(p.id), "file"]).with_suffix(".txt").read_text().strip()
        _caption_order_ok(caption, p, "mystyle")
        assert df.loc[str(p.id), "caption"] == caption

    version = read_version(paths, "v0001")
    assert sorted(version["files"]) == sorted(kept.file)
    assert version["count"] == len(kept) and sorted(map(str, version["post_ids"])) == sorted(kept.index)
    on_disk = sorted(f"images/{p.name}" for p in paths.images.iterdir() if p.suffix != ".txt")
    assert on_disk == sorted(kept.file)
    assert all((paths.root / f).with_suffix(".txt").exists() for f in kept.file)
    # The staging area is empty again: nothing half-done left behind.
    assert not [p for p in paths.staging.rglob("*") if p.is_file()]


def test_second_run_asks_only_for_newer_posts_and_adds_a_version(booru_factory, fetch, workspace):
    server = booru_factory(generate_posts(12, seed=3, traps=False))
    first = fetch(server, tags="status:any")
    assert first.version == "v0001" and first.kept == 12
    paths = DatasetPaths.of(workspace, "d")
    v1_bytes = (paths.versions / "v0001.json").read_bytes()
    state = json.loads(paths.state.read_text())["queries"]["default"]
    assert (state["newest_id"], state["oldest_id"], state["exhausted"]) == (1011, 1000, True)

    new = server.add_posts(3)
    server.clear_requests()
    second = fetch(server, tags="status:any")
    pages = [r.query.get("page") for r in server.requests if r.path == "/posts.json"]
    assert pages and all(p and p.startswith("a") for p in pages), pages
    assert pages[0] == "a1011"
    assert sorted(p.removeprefix("/data/").split(".")[0] for p in _files_fetched(server)) == sorted(
        str(p.id) for p in new)
    assert second.kept == 3 and second.version == "v0002" and second.total_kept == 15
    assert (paths.versions / "v0001.json").read_bytes() == v1_bytes
    v1, v2 = read_version(paths, "v0001"), read_version(paths, "v0002")
    assert v2["parent"] == "v0001" and v2["count"] == 15
    assert set(v1["files"]) < set(v2["files"])
    assert json.loads(paths.state.read_text())["queries"]["default"]["newest_id"] == max(p.id for p in new)

    third = fetch(server, tags="status:any")
    assert third.kept == 0 and third.version is None
    assert list_versions(paths) == ["v0001", "v0002"]
    assert len(load_manifest(paths)) == 15


def test_target_size_grows_the_data_set_by_walking_older_posts(booru_factory, fetch, workspace):
    server = booru_factory(generate_posts(30, seed=5, traps=False))
    first = fetch(server, target_size=10)
    assert first.total_kept == 10 and first.version == "v0001"
    paths = DatasetPaths.of(workspace, "d")
    oldest = json.loads(paths.state.read_text())["queries"]["default"]["oldest_id"]
    first_files = set(_files_fetched(server))
    assert len(first_files) == 10

    server.clear_requests()
    grown = fetch(server, target_size=20)
    assert grown.total_kept == 20 and grown.kept == 10 and grown.version == "v0002"
    pages = [r.query.get("page") for r in server.requests if r.path == "/posts.json"]
    assert f"b{oldest}" in pages
    assert not first_files & set(_files_fetched(server)), "already-kept posts were downloaded again"
    df = load_manifest(paths)
    assert df.id.is_unique and (df.status == "kept").sum() == 20
    # Every new post is older than what the first run took.
    assert df[df.version_added == "v0002"].post_id.max() < oldest


def test_several_queries_keep_their_own_cursor_limit_and_counts(booru_factory, fetch, workspace):
    from lora.data.refresh import QuerySpec

    posts = generate_posts(60, seed=11, traps=False)
    server = booru_factory(posts)
    queries = [QuerySpec("sketch_aesthetic", "sketch", limit=2), QuerySpec("soft_focus_landscape", "landscape")]
    summary = fetch(server, queries=queries, limit=3)

    paths = DatasetPaths.of(workspace, "d")
    df = load_manifest(paths)
    per_query = df.groupby("query").size().to_dict()
    assert per_query == {"sketch_aesthetic": 2, "soft_focus_landscape": 3}
    assert summary.per_query["sketch_aesthetic"]["kept"] == 2
    assert summary.per_query["soft_focus_landscape"]["kept"] == 3
    for _, row in df.iterrows():
        tag = "sketch" if row["query"] == "sketch_aesthetic" else "landscape"
        assert tag in row["tags_general"].split()
    state = json.loads(paths.state.read_text())["queries"]
    assert state["sketch_aesthetic"]["tags"] == "sketch"
    assert state["soft_focus_landscape"]["tags"] == "landscape"
    assert state["sketch_aesthetic"]["oldest_id"] != state["soft_focus_landscape"]["oldest_id"]
    version = read_version(paths)
    assert version["queries"] == {"sketch_aesthetic": "sketch", "soft_focus_landscape": "landscape"}
    assert "sketch_aesthetic" in summary.format_table()


def test_parent_groups_are_recorded_and_optionally_deduplicated(booru_factory, fetch, workspace):
    posts = generate_posts(6, seed=13, traps=False)
    posts[2].parent_id = posts[1].id   # a child of post 1
    posts[3].parent_id = posts[1].id   # its sibling
    server = booru_factory(posts)
    fetch(server, dataset="plain")
    df = load_manifest(DatasetPaths.of(workspace, "plain")).set_index("id")
    assert (df.status == "kept").all() and df.loc[str(posts[2].id), "parent_id"] == posts[1].id

    summary = fetch(server, dataset="grouped", group_parents=True)
    df = load_manifest(DatasetPaths.of(workspace, "grouped")).set_index("id")
    assert summary.kept == 4 and summary.reasons == {"same-parent-as": 2}
    for child in posts[2:4]:
        assert df.loc[str(child.id), "duplicate_of"] == str(posts[1].id)
