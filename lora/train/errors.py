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


def one_line(exc: BaseException, limit: int | None = 300) -> str:
    """An exception's message on one line, cut at ``limit`` characters (for a log line or an
    error that must not carry the exception, whose traceback pins a failed step's tensors);
    ``None``: the whole message."""
    return " ".join(str(exc).split())[:limit]
