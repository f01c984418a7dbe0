"""The `dataset-refresh` flow on a real temporary Prefect server against the loopback Danbooru."""
from __future__ import annotations

import asyncio
import json

from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.versions import read_version
from lora.testing.fakebooru import generate_posts


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    return asyncio.run(read())


def test_dataset_refresh_flow_fetches_shards_and_reports(prefect_api, booru_factory, workspace, monkeypatch):
    from flows.dataset_refresh import dataset_refresh

    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    server = booru_factory(generate_posts(40, seed=0))
    result = dataset_refresh(
        workspace=str(workspace), dataset="flowds", tags="status:any", limit=None, target_size=20,
        ratings="g,s,q,e", booru_url=server.url, requests_per_second=10.0, trigger_word="fl",
        shard_size=6, retry_backoff_s=0.01,
    )
    assert result["version"] == "v0001"
    assert result["total_kept"] >= 20 and result["kept"] == result["total_kept"]
    assert result["duplicates"] >= 1 and result["reasons"]
    paths = DatasetPaths.of(workspace, "flowds")
    df = load_manifest(paths)
    assert df.id.is_unique and (df.status == "kept").sum() == result["total_kept"]
    assert sorted(read_version(paths)["files"]) == sorted(df[df.status == "kept"].file)
    assert json.loads(paths.state.read_text())["queries"]["default"]["oldest_id"] is not None

    table = _artifacts("dataset-refresh-flowds")
    assert table, "no summary table artifact"
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    kept_row = next(r for r in rows if r["outcome"] == "kept")
    assert kept_row["count"] == result["kept"]
    assert {r["reason"]: r["count"] for r in rows if r["reason"]} == result["reasons"]
    assert result["failed"] == 1  # the md5-mismatch post: tried once per refresh, not per round
    progress = _artifacts("dataset-refresh-progress-flowds")
    assert progress and float(progress[0].data) == 100.0

    again = dataset_refresh(
        workspace=str(workspace), dataset="flowds", tags="status:any", limit=None, target_size=20,
        ratings="g,s,q,e", booru_url=server.url, requests_per_second=10.0, retry_backoff_s=0.01,
    )
    assert again["version"] is None and again["kept"] == 0


def test_flow_reads_credentials_from_a_secret_block_and_never_stores_them(
    prefect_api, booru_factory, workspace, monkeypatch
):
    from prefect.blocks.system import Secret

    from flows.dataset_refresh import dataset_refresh

    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    secret = "blockkey-7c1d5e0a"
    Secret(value=f"bob:{secret}").save("datapipe-danbooru", overwrite=True)
    server = booru_factory(generate_posts(8, seed=8, traps=False), credentials={"bob": secret})
    result = dataset_refresh(
        workspace=str(workspace), dataset="sec", tags="status:any -animated -video", limit=4,
        ratings="g,s,q,e", booru_url=server.url, requests_per_second=10.0,
        credentials_block="datapipe-danbooru", retry_backoff_s=0.01,
    )
    assert result["kept"] == 4
    api = [r for r in server.requests if r.path == "/posts.json"]
    assert api and all(r.auth_login == "bob" for r in api)
    for path in workspace.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_nightly_deployment_is_a_cron_schedule_of_dataset_refresh():
    from deployments.dataset_refresh import nightly_deployment

    deployment = nightly_deployment()
    assert deployment.name == "nightly" and deployment.flow_name == "dataset-refresh"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters["limit"] == 100 and "data" in deployment.tags
