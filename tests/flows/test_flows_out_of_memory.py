"""Out of GPU memory is not a transient fault: the segment fails at once, saying what to change.

The trainer's own fallback (half the micro-batch, same effective batch) is tested with the
training engine; what gets past it reaches the task, and retrying the same batch on the same
card would only fail again while holding the `gpu` slot.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import exception_to_failed_state

from flows.train_lora import train_lora
from lora.testing.datasets import write_synthetic_dataset
from lora.train.launch import SegmentLaunchError
from lora.train import NonFiniteLossError, TrainingError
from tasks.retry import is_out_of_memory
from tasks.train import FAULT_KIND_ENV, FAULT_ONCE_ENV, SegmentOutOfMemory, _is_transient


def _retried(exc: BaseException) -> bool:
    """What the train-segment task's retry condition says about a failure with ``exc``."""
    state = asyncio.run(exception_to_failed_state(exc))
    return _is_transient(None, None, state)


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total)"),
    RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB"),
    RuntimeError("CUDA error: out of memory"),
    TrainingError("out of memory at step 7 even with micro-batch 1; enable low_memory"),
    SegmentLaunchError("2-process training segment failed (exit 1): OutOfMemoryError: CUDA out of memory."),
    SegmentOutOfMemory("segment 1: out of GPU memory"),
], ids=["torch-oom", "cuda-runtime", "cuda-error", "trainer-fallback-exhausted", "torchrun", "segment"])
def test_out_of_memory_is_not_retried(exc):
    assert is_out_of_memory(exc) or isinstance(exc, SegmentOutOfMemory)
    assert _retried(exc) is False


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    OSError("No space left on device"),
    NonFiniteLossError("loss became NaN at step 12"),
    SegmentLaunchError("2-process training segment failed (exit -9): killed"),
], ids=["cuda-fault", "disk", "nan", "torchrun-killed"])
def test_transient_faults_are_still_retried(exc):
    assert not is_out_of_memory(exc)
    assert _retried(exc) is True


def test_segment_out_of_memory_fails_fast_with_a_clear_message(prefect_api, tmp_path, monkeypatch):
    """An OOM in the first segment (once: a retry would succeed) fails the run on the first try."""
    ws = tmp_path / "ws"
    write_synthetic_dataset(ws / "datasets" / "demo", 12, [(96, 96), (128, 80)])
    marker = tmp_path / "oom-once"
    monkeypatch.setenv(FAULT_ONCE_ENV, str(marker))
    monkeypatch.setenv(FAULT_KIND_ENV, "oom")
    state = train_lora(data={"workspace": str(ws), "dataset": "demo", "target_size": 12},
                       training={"model": "tiny", "run_name": "oom", "max_steps": 2},
                       results={"sample": False}, return_state=True)
    assert marker.exists(), "the injected out-of-memory error never fired"
    assert state.is_failed(), state
    with pytest.raises(SegmentOutOfMemory) as caught:
        state.result()
    message = str(caught.value)
    assert "out of GPU memory" in message and "not retried" in message
    assert "batch_size (now 4)" in message and "low_memory" in message
    assert "CUDA out of memory" in message

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    segments = [t for t in runs if t.name.startswith("train-segment")]
    assert [(t.name, t.run_count) for t in segments] == [("train-segment-1", 1)]
    assert not (ws / "runs" / "oom" / "lora").exists()
