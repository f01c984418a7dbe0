"""Retry conditions for Prefect tasks: retry what a second try can fix, nothing else."""
from __future__ import annotations

from typing import Any, Callable


def retry_unless(*permanent: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A ``retry_condition_fn`` that retries any failure except the ``permanent`` kinds.

    A bad config, a refused API key or an invalid query fails the same way on every try, so
    retrying it only delays the error; network trouble, I/O errors and lost devices are
    worth another go.
    """

    def condition(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception:
            return True
        return True

    return condition
