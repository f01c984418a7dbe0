"""The `gpu` global concurrency limit: how many trainings may run at once on a worker's GPUs.

Every training segment holds one slot of this limit while it trains. The limit is made sure of
in three places, so no path can run two trainings on one GPU by accident: `animelora serve`,
`prefect deploy` (a build step of prefect.yaml) and the segment itself, right before it
acquires its slot *strictly* (a missing limit is an error there, never "skip and run anyway").

Two settings, read from the environment of the process that makes sure of the limit (the
serving process, the deploying shell, or the flow run, which inherits the worker's
environment):

- ``ANIMELORA_GPU_SLOTS``: the number of trainings that may run at once (default 1). Set it
  on a multi-GPU host that runs one worker per card; when set, an existing limit with another
  size is resized to it. Left unset, an existing limit keeps whatever size it has (e.g. after
  `prefect gcl update gpu --limit 2`).
- ``ANIMELORA_GPU_LIMIT``: the limit's name (default ``gpu``). Workers on different hosts that
  share one Prefect server each give their host its own name (``gpu-hostA``), so one host's
  training does not hold back another host's GPU.
"""
from __future__ import annotations

import os

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

#: The default name of the limit (``ANIMELORA_GPU_LIMIT`` overrides it).
GPU_LIMIT = "gpu"
GPU_LIMIT_ENV = "ANIMELORA_GPU_LIMIT"
GPU_SLOTS_ENV = "ANIMELORA_GPU_SLOTS"


def gpu_limit_name() -> str:
    """The limit this process's trainings hold a slot of."""
    return os.environ.get(GPU_LIMIT_ENV, "").strip() or GPU_LIMIT


def gpu_slots_setting() -> int | None:
    """``ANIMELORA_GPU_SLOTS`` as a number, ``None`` when unset; a bad value is a clear error."""
    raw = os.environ.get(GPU_SLOTS_ENV, "").strip()
    if not raw:
        return None
    try:
        slots = int(raw)
    except ValueError:
        slots = 0
    if slots < 1:
        raise ValueError(f"{GPU_SLOTS_ENV}: expected a whole number of 1 or more, got {raw!r}")
    return slots


def ensure_gpu_limit(slots: int | None = None, name: str | None = None) -> tuple[str, int]:
    """Create the limit when it is missing; resize it when ``slots`` is given and differs.

    ``slots`` defaults to ``ANIMELORA_GPU_SLOTS``; with neither, a new limit gets 1 slot and
    an existing one is kept as it is. Safe to call from many processes at once (a limit
    created by another process in between is fine). Returns (name, size).
    """
    name = name or gpu_limit_name()
    wanted = slots if slots is not None else gpu_slots_setting()
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=wanted or 1)
                )
            except ObjectAlreadyExists:
                pass  # another run created it a moment ago
            return name, wanted or 1
        if wanted is not None and existing.limit != wanted:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=wanted))
            return name, wanted
        return name, existing.limit


def ensure_gpu_limit_step() -> dict[str, object]:
    """prefect.yaml build step: make sure of the limit when `prefect deploy` runs.

    Its outputs (``gpu_limit``, ``gpu_slots``) can be referenced by later steps.
    """
    name, slots = ensure_gpu_limit()
    return {"gpu_limit": name, "gpu_slots": slots}
