"""Prefect tasks for the results half of the DAG: analysis, samples, publishing.

Each task calls the Prefect-free library and turns its output into UI artifacts a person can
open from the UI: a markdown report (metrics, verdict, comparison, its plots drawn in place),
a table of per-epoch losses, the samples grid as an image, the LoRA files and the model card
with their paths as text. The UI is a web page on the API server's address, so it cannot open
``file://`` links to the worker's disk: images travel inside the artifact, paths are shown to
be copied. A published repository gets a real link.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE

from lora.analysis import analyze_log, compare_runs, write_report
from lora.fsutil import human_size
from lora.gate import gate_comparison, publish_gate
from lora.runpaths import DIFFUSERS_WEIGHTS, SAMPLES_JSON, RunPaths
from tasks.artifacts import (
    artifact_key,
    inline_image,
    inline_relative_images,
    path_text,
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


@task(name="analyze-run", cache_policy=NO_CACHE)
def analyze_run(run_dir: str, run_name: str, compare_dir: str | None = None,
                workspace: str | None = None) -> dict[str, Any]:
    """Analyze the training log, compare with a previous run, write report/ and artifacts.

    The publish gate's comparison (against the compared run, else the base model at step 0)
    goes into the metrics with its 95% interval; with ``workspace`` the report also shows the
    guide's ladder of runs on the same data set."""
    from lora.analysis.ladder import build_ladder

    logger = get_run_logger()
    analysis = analyze_log(Path(run_dir), name=run_name)
    comparison = None
    baseline: dict[str, Any] | None = None
    base_analysis = None
    if compare_dir:
        base_analysis = analyze_log(Path(compare_dir), name=Path(compare_dir).name)
        baseline = base_analysis.to_dict()
        comparison = compare_runs([analysis, base_analysis])
    gate = gate_comparison(analysis, base_analysis)
    ladder = build_ladder(workspace, run_dir) if workspace else None
    report_md = write_report(Path(run_dir), analysis, comparison, gate=gate, ladder=ladder)
    metrics = analysis.to_dict()
    if gate is not None:
        metrics["gate_comparison"] = gate
        logger.info("validation loss vs the %s: %s", gate.get("against"), gate.get("text"))
    logger.info("verdict: %s", metrics.get("verdict"))

    losses = metrics.get("losses", [])
    create_table_artifact(
        key=artifact_key("epoch-losses", run_name),
        table=[{k: _fmt(v) for k, v in row.items()} for row in losses],
        description=f"Per-epoch training loss of run {run_name}",
    )
    report_dir = Path(report_md).parent
    markdown = inline_relative_images(Path(report_md).read_text(), report_dir)
    plot = RunPaths(run_dir).loss_plot
    if plot.exists() and "data:image/" not in markdown:
        markdown += "\n\n" + inline_image(plot, "loss curve") + "\n"
    markdown += f"\n\nReport folder: {path_text(report_dir)}\n"
    create_markdown_artifact(
        key=artifact_key("training-report", run_name),
        markdown=markdown,
        description=f"Metrics, verdict and comparison for run {run_name}",
    )
    return {"metrics": metrics, "baseline": baseline}


@task(name="generate-samples", cache_policy=NO_CACHE)
def sample_run(
    model: str, run_dir: str, run_name: str, compare_dir: str | None = None
) -> dict[str, Any]:
    """Base model vs this LoRA (and vs the compared run's LoRA) at fixed prompts and seeds."""
    from lora.sample import generate_samples

    paths = RunPaths(run_dir)
    run_dirs = [Path(run_dir)] + ([Path(compare_dir)] if compare_dir else [])
    result = generate_samples(model, run_dirs, paths.samples)
    grid = Path(getattr(result, "grid_path", paths.samples_grid))
    columns = list(getattr(result, "columns", []) or [])
    create_markdown_artifact(
        key=artifact_key("samples-grid", run_name),
        markdown=_samples_markdown(run_name, grid, columns),
        description="Base model vs LoRA at fixed prompts and seeds",
    )
    return {"grid": str(grid)}


def _samples_markdown(run_name: str, grid: Path, columns: list[str]) -> str:
    parts = [f"## Samples: {run_name}", ""]
    if columns:
        parts += ["Columns, left to right: " + ", ".join(f"**{c}**" for c in columns)
                  + "; one row per prompt and seed (the same starting noise in every column).", ""]
    parts += [inline_image(grid, f"samples grid of {run_name}"), "",
              f"Full-size grid: {path_text(grid)}; single images and their settings "
              f"({SAMPLES_JSON}) in {path_text(grid.parent)}", ""]
    return "\n".join(parts)


def _lora_format(path: Path) -> str:
    if path.name == DIFFUSERS_WEIGHTS:
        return "diffusers (load_lora_weights)"
    return "kohya (A1111, ComfyUI)"


@task(name="list-lora-files", cache_policy=NO_CACHE)
def link_lora_files(run_dir: str, run_name: str) -> list[str]:
    """A table of the run's LoRA files: name, format, size and the full path to copy."""
    files = RunPaths(run_dir).lora_files()
    if files:
        create_table_artifact(
            key=artifact_key("lora-files", run_name),
            table=[{"file": p.name, "format": _lora_format(p), "size": human_size(p.stat().st_size),
                    "path": str(p.resolve())} for p in files],
            description=f"LoRA weights of run {run_name} (paths on the machine that trained it)",
        )
    return [str(p) for p in files]


@task(name="publish", cache_policy=NO_CACHE)
def publish_run(
    run_dir: str,
    run_name: str,
    metrics: dict[str, Any],
    baseline: dict[str, Any] | None,
    publish: bool,
    repo_id: str | None,
    dry_run: bool,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    allow_test_model: bool = False,
) -> dict[str, Any]:
    """Publish when asked and when the gate passes; otherwise say why it was skipped.

    A run of the tiny test model is uploaded only with ``allow_test_model`` (dry runs stage it)."""
    from lora.hub import publish as hub_publish
    from lora.hub import stage_run

    logger = get_run_logger()
    decision = publish_gate(metrics, baseline)
    if not publish and not dry_run:
        outcome = {"published": False, "reason": "publishing was not asked for (publish=false)"}
    elif not repo_id:
        outcome = {"published": False, "reason": "no repo_id given"}
    elif not decision.passed and not dry_run:
        outcome = {"published": False, "reason": f"gate failed: {decision.reason}"}
    else:
        result = hub_publish(
            Path(run_dir), repo_id, token=token, endpoint=endpoint, private=private,
            dry_run=dry_run, allow_test_model=allow_test_model,
        )
        url = getattr(result, "url", None) or getattr(result, "commit_url", None)
        outcome = {
            "published": not dry_run,
            "dry_run": dry_run,
            "reason": ("dry run: staged only; " if dry_run else "") + f"gate: {decision.reason}",
            "url": url,
        }
    paths = RunPaths(run_dir)
    if repo_id and not paths.hub.exists():
        stage_run(Path(run_dir), repo_id=repo_id)
    card = paths.hub_card
    if card.exists():
        create_markdown_artifact(
            key=artifact_key("model-card", run_name),
            markdown=_card_markdown(card),
            description="The staged Hub model card",
        )
    if outcome.get("published") and str(outcome.get("url") or "").startswith(("http://", "https://")):
        create_link_artifact(
            key=artifact_key("hub-repo", run_name),
            link=str(outcome["url"]),
            link_text=repo_id or str(outcome["url"]),
            description="The published model repository",
        )
    logger.info("publish: %s", outcome["reason"])
    create_markdown_artifact(
        key=artifact_key("publish", run_name),
        markdown=f"## Publish\n\n- published: **{outcome['published']}**\n- {outcome['reason']}\n",
        description="Publish decision",
    )
    return outcome


def _card_markdown(card: Path) -> str:
    """The staged card as text (what the Hub will show), with where the staged folder is.

    Shown in a fence rather than rendered: its images point into the staged folder, which the
    UI cannot reach, and the YAML header is part of what gets uploaded.
    """
    text = card.read_text(encoding="utf-8")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return (
        f"## Model card (staged)\n\nStaged folder: {path_text(card.parent)}\n\n"
        f"{fence}markdown\n{text.rstrip()}\n{fence}\n"
    )
