"""Retry conditions for Prefect tasks: retry what a second try can fix, nothing else."""
from __future__ import annotations

from typing import Any, Callable


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU (or CPU allocator) out-of-memory error, whatever layer raised it.

    ``torch.OutOfMemoryError`` itself, a ``RuntimeError`` whose text says "out of memory"
    (older PyTorch, cuDNN/cuBLAS allocation failures, the trainer's own "out of memory even
    with micro-batch N" error, a torchrun segment that relays the children's error line).
    """
    try:
        import torch

        oom_type = getattr(torch, "OutOfMemoryError", None)
    except ImportError:  # pragma: no cover - torch is a dependency
        oom_type = None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def retry_unless(
    *permanent: type[BaseException],
    when: Callable[[BaseException], bool] | None = None,
) -> Callable[[Any, Any, Any], bool]:
    """A ``retry_condition_fn`` that retries any failure except the ``permanent`` kinds
    (and, with ``when``, except the failures it says yes to).

    A bad config, a refused API key, an invalid query or a batch that does not fit in GPU
    memory fails the same way on every try, so retrying it only delays the error; network
    trouble, I/O errors and lost devices are worth another go.
    """

    def condition(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception as exc:
            return not (when is not None and when(exc))
        return True

    return condition
