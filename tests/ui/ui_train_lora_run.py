"""Runs the real `train-lora` flow (tiny model, loopback Danbooru) for the browser test.

Run as a script in a subprocess whose environment carries PREFECT_API_URL; the last line of
stdout is JSON: ``{"flow_run_id", "flow_run_name", "artifact_keys"}``.
"""
from __future__ import annotations

import argparse
import json

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.train_lora import train_lora
from lora.testing.fakebooru import FakeDanbooru, generate_posts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    with FakeDanbooru(generate_posts(80, seed=7)) as booru:
        state = train_lora(
            data={"workspace": args.workdir, "dataset": "ui", "tags": "1girl", "target_size": 12,
                  "booru_url": booru.url, "requests_per_second": 10.0},
            training={"model": "tiny", "run_name": args.run_name, "max_steps": 8},
            results={"publish_dry_run": True, "repo_id": "someone/ui-lora"},
            return_state=True,
        )
    if not state.is_completed():
        raise SystemExit(f"train-lora did not complete: {state}")
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    keys = sorted({a.key for a in artifacts if a.key})
    print(json.dumps({"flow_run_id": str(flow_run_id), "flow_run_name": run.name,
                      "artifact_keys": keys}), flush=True)


if __name__ == "__main__":
    main()
