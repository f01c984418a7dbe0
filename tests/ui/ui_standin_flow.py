"""A small flow that leaves the same kinds of artifacts as `train-lora`, for the browser test.

It mirrors the artifact keys the real tasks create (``tasks/results.py``, ``flows/train_lora.py``):
``training-progress-<run>`` (progress), ``epoch-losses-<run>`` (table),
``training-report-<run>`` (markdown with a metrics table and a data-URI PNG loss plot) and
link artifacts ``lora-diffusers-<run>``, ``lora-kohya-a1111-<run>``, ``samples-grid-<run>``.

Run as a script (in a subprocess whose environment carries PREFECT_API_URL); the last line of
stdout is JSON: ``{"flow_run_id", "flow_run_name", "artifact_keys"}``.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

EPOCH_LOSSES = [0.1523, 0.1311, 0.1207, 0.1164]


def loss_plot_png(losses: list[float]) -> bytes:
    """A tiny line plot of the losses (Pillow, so no matplotlib start-up cost)."""
    width, height, pad = 240, 120, 12
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    points = [
        (pad + i * (width - 2 * pad) / max(1, len(losses) - 1), pad + (hi - v) / span * (height - 2 * pad))
        for i, v in enumerate(losses)
    ]
    draw.rectangle([0, 0, width - 1, height - 1], outline="black")
    draw.line(points, fill="blue", width=3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def report_markdown(run_name: str, losses: list[float]) -> str:
    png = base64.b64encode(loss_plot_png(losses)).decode("ascii")
    rows = "\n".join(f"| {i} | {loss:.4f} |" for i, loss in enumerate(losses, start=1))
    return (
        f"# Training report: {run_name}\n\n"
        "| metric | value |\n| --- | --- |\n"
        f"| final epoch loss | {losses[-1]:.4f} |\n"
        f"| best epoch loss | {min(losses):.4f} |\n"
        f"| validation loss | 0.1180 |\n\n"
        "**Verdict:** improved (validation loss -4.2% vs the compared run)\n\n"
        "## Per-epoch loss\n\n| epoch | loss |\n| --- | --- |\n"
        f"{rows}\n\n"
        f"![loss](data:image/png;base64,{png})\n"
    )


@task
def train_standin(run_name: str, progress_id: str) -> list[dict]:
    for step in (25, 50, 100):
        update_progress_artifact(
            artifact_id=progress_id, progress=float(step), description=f"{run_name}: {step}% done"
        )
    return [{"epoch": i, "loss": loss, "time_seconds": 1.5} for i, loss in enumerate(EPOCH_LOSSES, 1)]


@task
def publish_artifacts(run_name: str, losses: list[dict], workdir: str) -> list[str]:
    folder = Path(workdir)
    (folder / "lora").mkdir(parents=True, exist_ok=True)
    files = {
        f"lora-diffusers-{run_name}": folder / "lora" / "pytorch_lora_weights.safetensors",
        f"lora-kohya-a1111-{run_name}": folder / "lora" / f"{run_name}.safetensors",
        f"samples-grid-{run_name}": folder / "samples-grid.png",
    }
    for key, path in files.items():
        path.write_bytes(b"stand-in")
        create_link_artifact(key=key, link=path.resolve().as_uri(), link_text=path.name)
    create_table_artifact(key=f"epoch-losses-{run_name}", table=losses, description="Per-epoch training loss")
    create_markdown_artifact(
        key=f"training-report-{run_name}",
        markdown=report_markdown(run_name, [row["loss"] for row in losses]),
        description="Training report",
    )
    return [f"epoch-losses-{run_name}", f"training-report-{run_name}", *files]


@flow(name="ui-standin-train")
def ui_standin_train(run_name: str, workdir: str) -> dict:
    get_run_logger().info("stand-in training for %s", run_name)
    progress_key = f"training-progress-{run_name}"
    progress_id = create_progress_artifact(progress=0.0, key=progress_key, description="starting")
    losses = train_standin(run_name, str(progress_id))
    keys = publish_artifacts(run_name, losses, workdir)
    return {
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "artifact_keys": [progress_key, *keys],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-name", required=True, help="artifact-key-safe: lowercase, digits, dashes")
    parser.add_argument("--flow-run-name", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    result = ui_standin_train.with_options(flow_run_name=args.flow_run_name)(args.run_name, args.workdir)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
