"""The training engine's errors, apart so every module of lora/train can raise them without
importing the loop."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. out of memory even at half the micro-batch)."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf (divergence); retry resumes from a checkpoint."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error, whatever torch version raised it."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
