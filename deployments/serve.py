"""Serve every deployment of the project from one process (no worker needed).

`animelora serve` (or `python -m deployments.serve`) registers `train-lora/<preset>` and
`dataset-refresh/nightly` with the Prefect API in PREFECT_API_URL and runs their flow runs
until stopped. It also makes sure the global concurrency limit `gpu` exists, so two trainings
never share one GPU.
"""
from __future__ import annotations

import os
import sys

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from deployments.dataset_refresh import nightly_deployment
from deployments.train_lora import train_lora_deployments
from tasks.train import GPU_LIMIT


def all_deployments() -> list:
    return [*train_lora_deployments(), nightly_deployment()]


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the `gpu` global concurrency limit if it is missing (an existing one is kept)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots)
            )


def main(limit: int | None = None) -> int:
    if not PREFECT_API_URL.value():
        print(
            "error: PREFECT_API_URL is not set; start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (animelora serve starts no server)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lora")
    ensure_gpu_limit(int(os.environ.get("ANIMELORA_GPU_SLOTS", "1")))
    serve(*all_deployments(), limit=limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
