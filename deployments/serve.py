"""Serve every deployment of the project from one process (no worker needed).

`animelora serve` (or `python -m deployments.serve`) registers `train-lora/<preset>`,
`sweep/phase2a-lr-rank`, `sweep-candidate/train` and `dataset-refresh/nightly` with the Prefect API in PREFECT_API_URL and runs their flow runs
until stopped. It also makes sure the global concurrency limit `gpu` exists (tasks/gpu.py:
``ANIMELORA_GPU_SLOTS`` sets its size, ``ANIMELORA_GPU_LIMIT`` its name), so two trainings
never share one GPU, and schedules the nightly refresh in ``ANIMELORA_TIMEZONE`` (UTC).
"""
from __future__ import annotations

import os
import sys

from prefect import serve
from prefect.settings import PREFECT_API_URL

from deployments.common import FLOW_RUN_ENV
from deployments.dataset_refresh import nightly_deployment
from deployments.sweep import sweep_deployments
from deployments.train_lora import train_lora_deployments
from tasks.gpu import ensure_gpu_limit, gpu_slots_setting


def all_deployments() -> list:
    """Every deployment of the project, as declared in Python (prefect.yaml is made from these)."""
    return [*train_lora_deployments(), *sweep_deployments(), nightly_deployment()]


def main(limit: int | None = None) -> int:
    if not PREFECT_API_URL.value():
        print(
            "error: PREFECT_API_URL is not set; start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (animelora serve starts no server)",
            file=sys.stderr,
        )
        return 2
    try:
        deployments = all_deployments()
        gpu_slots_setting()
    except ValueError as exc:  # ANIMELORA_TIMEZONE / ANIMELORA_GPU_SLOTS
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # served flow runs are child processes of this one: they inherit these
    for key, value in FLOW_RUN_ENV.items():
        os.environ.setdefault(key, value)
    ensure_gpu_limit()
    serve(*deployments, limit=limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
