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


def smaller_batch(current: int, failed: int) -> int:
    """The batch to try after ``failed`` items ran out of memory: ``current`` halved until it is
    below ``failed`` (at least 1). The latent cache and the validation loss back off this way."""
    batch = max(1, current // 2)
    while batch >= failed and batch > 1:
        batch //= 2
    return batch


def free_cached_memory(device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error (CUDA only), so the
    smaller retry has the room; call it outside the ``except`` block, whose traceback pins the
    failed attempt's tensors."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def one_line(exc: BaseException, limit: int | None = 300) -> str:
    """An exception's message on one line, cut at ``limit`` characters (for a log line or an
    error that must not carry the exception, whose traceback pins a failed step's tensors);
    ``None``: the whole message."""
    return " ".join(str(exc).split())[:limit]
