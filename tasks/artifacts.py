"""Small helpers for Prefect artifacts: keys must be lowercase letters, digits and dashes."""
from __future__ import annotations

import re
import time
from typing import Any, Callable
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def artifact_key(*parts: str) -> str:
    """Turn free text (run names, presets like ``phase1.5``) into a valid artifact key."""
    key = "-".join(p for p in parts if p)
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower())
    return re.sub(r"-{2,}", "-", key).strip("-") or "artifact"


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressReporter:
    """A progress artifact that training updates at most every ``interval_s`` seconds.

    Updating on every step would flood the API server (SQLite locks under many writers),
    so updates are throttled; the last update is always forced.
    """

    def __init__(self, artifact_id: UUID | str | None, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self.artifact_id = UUID(str(artifact_id)) if artifact_id else None

    @classmethod
    def create(cls, key: str, description: str, interval_s: float = 2.0) -> "ProgressReporter":
        """Create the artifact (once per flow run); segments re-attach by ``artifact_id``."""
        artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
        return cls(artifact_id, interval_s)

    def update(self, progress_pct: float, description: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.artifact_id is None or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        update_progress_artifact(
            artifact_id=self.artifact_id,
            progress=max(0.0, min(100.0, progress_pct)),
            description=description,
        )

    def training_callback(self, label: str) -> Callable[[dict[str, Any]], None]:
        """An ``on_progress`` callback for ``lora.train.train`` that reports step, loss and ETA."""

        def on_progress(info: dict[str, Any]) -> None:
            step = int(info.get("step", 0))
            total = max(1, int(info.get("total_steps", 1)))
            loss = info.get("loss")
            loss_txt = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
            self.update(
                100.0 * step / total,
                f"{label}: step {step}/{total}, loss {loss_txt}, ETA {format_eta(info.get('eta_s'))}",
                force=step >= total,
            )

        return on_progress
