"""Small helpers for Prefect artifacts: valid keys (lowercase letters, digits and dashes),
progress reporting, and images and paths a person can see from the UI."""
from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path
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


#: Images up to this size are embedded as they are; bigger ones (a samples grid of 512 px
#: tiles is easily 10+ MB) are scaled down first, so the artifact stays quick to open.
INLINE_MAX_BYTES = 1_500_000
#: Longest side of a scaled-down inline image, in pixels.
INLINE_MAX_SIDE = 1600


def inline_image(path: Path, alt: str) -> str:
    """Markdown for ``path`` embedded as a data URI, which the Prefect UI draws in place.

    The UI is a web page on the API server's address: it cannot open ``file://`` links nor
    fetch the worker's files, so an image must travel inside the artifact itself.
    """
    path = Path(path)
    data, mime = path.read_bytes(), "image/png"
    if len(data) > INLINE_MAX_BYTES:
        data, mime = _scaled_jpeg(path)
    encoded = base64.b64encode(data).decode("ascii")
    return f"![{alt}](data:{mime};base64,{encoded})"


def _scaled_jpeg(path: Path) -> tuple[bytes, str]:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((INLINE_MAX_SIDE, INLINE_MAX_SIDE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue(), "image/jpeg"


_RELATIVE_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+\.(?:png|jpe?g))\)")


def inline_relative_images(markdown: str, base_dir: Path) -> str:
    """Replace ``![alt](name.png)`` references to files next to the markdown with data URIs.

    A report written for the run folder (report.md beside loss_curve.png) shows broken images
    in the UI otherwise; references to files that do not exist are left as they are.
    """

    def replace(match: re.Match[str]) -> str:
        target = Path(base_dir) / match.group(2)
        return inline_image(target, match.group(1)) if target.is_file() else match.group(0)

    return _RELATIVE_IMAGE.sub(replace, markdown)


def training_samples_markdown(run_dir: Path | str) -> str | None:
    """The run's samples drawn while training as markdown (the growing grid drawn in place, the
    steps it shows and where the sets lie); None before the first set."""
    from lora.runpaths import RunPaths

    paths = RunPaths(run_dir)
    grid = paths.training_samples_grid
    if not grid.is_file():
        return None
    shown = ", ".join(str(s) for s in paths.training_sample_steps())
    return "\n".join([
        f"## Samples while training: {paths.name}", "",
        f"Sets drawn after steps {shown}; rows are prompt and seed, one column per step "
        "(at most ten, evenly spread).", "",
        inline_image(grid, "samples while training"), "",
        f"Every set: {path_text(paths.training_samples)}",
    ])


def publish_training_samples(run_dir: Path | str, run_name: str) -> bool:
    """Create, then update in place, the flow run's one ``training-samples-<run>`` artifact
    with the growing grid; False when there is nothing to show yet.

    Why updated and not re-created: a markdown artifact created again under its key adds a
    version, and the run's Artifacts tab lists every version as its own card (one per set).
    Outside a flow run (a direct call) each call creates one."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    markdown = training_samples_markdown(run_dir)
    if markdown is None:
        return False
    key = artifact_key("training-samples", run_name)
    existing = _flow_run_artifact(key)
    if existing is None:
        create_markdown_artifact(key=key, markdown=markdown, description=f"{run_name}: samples drawn while training")
    else:
        with get_client(sync_client=True) as client:
            client.update_artifact(existing, ArtifactUpdate(data=markdown))
    return True


def _flow_run_artifact(key: str) -> UUID | None:
    """The artifact this flow run already made under ``key``, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run.id))])),
            limit=1)
    return found[0].id if found else None


def path_text(path: Path | str) -> str:
    """A file path as markdown code (copyable text): a ``file://`` link opens nothing from the UI."""
    return f"`{Path(path).resolve()}`"
