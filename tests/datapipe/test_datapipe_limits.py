"""A fetch against a hostile or broken booru: oversized files, foreign file hosts and schemes,
malformed posts. Each such post is recorded once with its reason, the rest of the fetch goes
on, and a later run does not fetch it again."""
from __future__ import annotations

from animelora.cli import main as cli
from lora.data.manifest import DatasetPaths, load_manifest
from lora.testing.fakebooru import generate_posts


def _file_gets(server, post):
    return [r for r in server.requests if r.path == f"/data/{post.filename}"]


def test_traps_are_recorded_once_and_never_fetched_again(booru_factory, fetch, workspace):
    posts = generate_posts(10, seed=7, traps=False)
    big, ftp, foreign, plain = posts[2], posts[4], posts[6], posts[8]
    server = booru_factory(
        posts,
        oversize_ids={big.id},
        file_urls={ftp.id: "ftp://127.0.0.1:{port}/data/" + ftp.filename,
                   foreign.id: "http://localhost:{port}/data/" + foreign.filename},
        raw_items=[{"id": "12x", "md5": "abc"}],
    )
    summary = fetch(server)
    paths = DatasetPaths.of(workspace, "d")
    df = load_manifest(paths).set_index("id")
    reasons = {str(p.id): df.loc[str(p.id), "reason"] for p in (big, ftp, foreign)}
    assert reasons == {str(big.id): "oversized", str(ftp.id): "unsupported-url-scheme:ftp",
                       str(foreign.id): "file-host-not-allowed:localhost"}
    assert (df.loc[[str(big.id), str(ftp.id), str(foreign.id)], "status"] == "rejected").all()
    malformed = df[df.reason == "malformed-post:id"]
    assert len(malformed) == 1 and malformed.index[0].startswith("malformed-")
    assert summary.kept == 7 and summary.rejected == 4 and summary.failed == 0
    assert len(_file_gets(server, big)) == 1                      # read once, cut off, not retried
    assert _file_gets(server, big)[0].bytes_sent < 40 * 1024 * 1024
    assert str(plain.id) in df.index and df.loc[str(plain.id), "status"] == "kept"

    # A later run asks for newer posts only; nothing recorded is fetched or recorded again.
    server.clear_requests()
    again = fetch(server)
    assert again.kept == 0 and again.rejected == 0 and again.failed == 0
    assert not [r for r in server.requests if r.path.startswith("/data/")]
    assert len(load_manifest(paths)) == len(df)


def test_cli_allows_a_file_host_and_caps_the_size(booru_factory, workspace, capsys):
    posts = generate_posts(6, seed=8, traps=False)
    foreign = posts[1]
    server = booru_factory(posts, file_urls={foreign.id: "http://localhost:{port}/data/" + foreign.filename})
    base = ["fetch", "--booru-url", server.url, "--tags", "status:any", "--ratings", "g,s,q,e",
            "--requests-per-second", "10", "--workspace", str(workspace), "--dataset", "h"]
    assert cli(base + ["--allow-file-host", "localhost", "--max-file-mb", "0.001"]) == 0
    df = load_manifest(DatasetPaths.of(workspace, "h")).set_index("id")
    # every post declares more than 1 kB: refused from its metadata, nothing downloaded
    assert set(df.reason) == {"file-too-large"}
    assert not [r for r in server.requests if r.path.startswith("/data/")]

    assert cli(base + ["--dataset", "h2", "--allow-file-host", "localhost"]) == 0
    df = load_manifest(DatasetPaths.of(workspace, "h2")).set_index("id")
    assert df.loc[str(foreign.id), "status"] == "kept"
    capsys.readouterr()

    for bad in (["--allow-file-host", "http://x.org/"], ["--max-file-mb", "0"], ["--max-megapixels", "-1"]):
        assert cli(base + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and bad[0] in err
