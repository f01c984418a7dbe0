"""The `gpu` limit on a real Prefect server: made when missing, sized by ANIMELORA_GPU_SLOTS,
named per host by ANIMELORA_GPU_LIMIT, and an existing size kept unless a size is asked for."""
from __future__ import annotations

import uuid

import pytest
from prefect.client.orchestration import get_client

from tasks.gpu import GPU_LIMIT_ENV, GPU_SLOTS_ENV, ensure_gpu_limit, ensure_gpu_limit_step, gpu_limit_name


def _limit(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).limit


def test_limit_is_created_then_kept_or_resized(prefect_api, monkeypatch):
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(GPU_LIMIT_ENV, name)
    monkeypatch.delenv(GPU_SLOTS_ENV, raising=False)
    assert gpu_limit_name() == name
    assert ensure_gpu_limit() == (name, 1) and _limit(name) == 1

    monkeypatch.setenv(GPU_SLOTS_ENV, "3")  # a host with three cards
    assert ensure_gpu_limit_step() == {"gpu_limit": name, "gpu_slots": 3}
    assert _limit(name) == 3

    monkeypatch.delenv(GPU_SLOTS_ENV)  # no setting: whatever the limit was set to stays
    assert ensure_gpu_limit() == (name, 3) and _limit(name) == 3


def test_default_name_and_bad_slot_count(monkeypatch):
    monkeypatch.delenv(GPU_LIMIT_ENV, raising=False)
    assert gpu_limit_name() == "gpu"
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(GPU_SLOTS_ENV, bad)
        with pytest.raises(ValueError, match=f"{GPU_SLOTS_ENV}: expected a whole number of 1 or more"):
            ensure_gpu_limit(name="never-created")
