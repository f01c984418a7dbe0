"""The model card (``README.md``): front matter the Hub understands, and a body for people.

Front matter: base_model (only a real Hub id: the Hub links it and refuses anything else),
license, tags (lora, stable-diffusion, ...), instance_prompt (the trigger word) and widget
entries pointing at the staged sample images, so the Hub page shows them. Body: how to use the
LoRA in diffusers and (with the kohya file) in AUTOMATIC1111/ComfyUI, the training settings,
where the data came from, the metrics and the loss plot. A local base checkpoint (an anime
model that is not on the Hub) is named in the text only.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from lora.hub.runinfo import RunInfo
from lora.runpaths import DIFFUSERS_WEIGHTS, RunPaths

#: Paths inside the uploaded repo: the staged folder keeps the run folder's samples/ and report/.
IN_REPO = RunPaths("")

TAGS = ["lora", "stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "anime",
        "diffusers", "template:sd-lora"]
DEFAULT_LICENSE = "creativeml-openrail-m"
# Used in the usage snippets when the run's base model is not a Hub id (tiny, local files).
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


TEST_MODEL_NAMES = ("tiny", "tiny-sd15-v1")


def is_hub_id(model: str | None) -> bool:
    """True for ``owner/name`` ids; False for "tiny", local folders and single files."""
    if not model or not _HUB_ID.match(model):
        return False
    return not model.endswith((".safetensors", ".ckpt")) and not Path(model).exists()


def is_test_model(model: str | None) -> bool:
    """True when ``model`` is the tiny random-weight test model (``--model tiny``)."""
    return bool(model) and (model in TEST_MODEL_NAMES or Path(str(model)).name in TEST_MODEL_NAMES)


def model_display_name(model: str) -> str:
    """A local checkpoint by its file or folder name: the card never shows local paths."""
    if is_hub_id(model):
        return model
    return re.split(r"[\\/]", model.rstrip("/\\"))[-1] or model


def sample_widgets(info: RunInfo, prefix: str = f"{IN_REPO.samples.as_posix()}/") -> list[dict[str, Any]]:
    """One widget per prompt: this run's LoRA image at the first seed."""
    meta = info.samples or {}
    images = [i for i in meta.get("images", []) if isinstance(i, dict) and i.get("file")]
    lora_cols = [i.get("column") for i in images if i.get("lora")]
    column = info.run_name if info.run_name in lora_cols else (lora_cols[0] if lora_cols else None)
    widgets: list[dict[str, Any]] = []
    seen: set[str] = set()
    for image in images:
        prompt = image.get("prompt")
        if image.get("column") != column or not isinstance(prompt, str) or prompt in seen:
            continue
        if not (RunPaths(info.run_dir).samples / image["file"]).is_file():
            continue
        seen.add(prompt)
        entry: dict[str, Any] = {"text": prompt}
        if image.get("negative_prompt"):
            entry["parameters"] = {"negative_prompt": image["negative_prompt"]}
        entry["output"] = {"url": prefix + str(image["file"])}
        widgets.append(entry)
    return widgets


def card_metadata(info: RunInfo, *, license: str = DEFAULT_LICENSE) -> dict[str, Any]:
    """The YAML front matter as a dict."""
    meta: dict[str, Any] = {}
    test_model = is_test_model(info.trained_on)
    if is_hub_id(info.base_model) and not test_model:
        meta["base_model"] = info.base_model
    meta["license"] = license
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = ["lora", "test-model", "not-for-use"] if test_model else list(TAGS)
    if info.trigger_word:
        meta["instance_prompt"] = info.trigger_word
    widgets = sample_widgets(info)
    if widgets:
        meta["widget"] = widgets
    return meta


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    rows = [
        ("initial loss", _fmt(metrics.get("initial_loss"))),
        ("minimum loss", f"{_fmt(metrics.get('min_loss'))} (epoch {_fmt(metrics.get('min_epoch'))})"),
        ("final loss", _fmt(metrics.get("final_loss"))),
    ]
    imp = metrics.get("improvement_pct")
    rows.append(("improvement (the guide's metric)", f"{imp:+.1f}%" if isinstance(imp, (int, float)) else "-"))
    spikes = metrics.get("spikes") or []
    rows.append(("spikes", ", ".join(f"+{s['jump_pct']:.1f}% at epoch {s['epoch']}"
                                     for s in spikes if isinstance(s, dict)) or "none"))
    val = metrics.get("validation")
    if isinstance(val, dict):
        rows += [("validation loss, first", _fmt(val.get("initial_loss"))),
                 ("validation loss, final", _fmt(val.get("final_loss")))]
        vimp = val.get("improvement_pct")
        if isinstance(vimp, (int, float)):
            rows.append(("validation improvement", f"{vimp:+.1f}%"))
        per = val.get("per_timestep_final")
        if isinstance(per, dict) and per:
            rows.append(("validation final, per timestep",
                         ", ".join(f"t={t}: {_fmt(v)}" for t, v in per.items())))
    gate = metrics.get("gate_comparison")  # paired, 95% interval (lora/gate.py)
    if isinstance(gate, dict) and gate.get("status") == "ok":
        rows.append((f"validation loss vs {gate.get('against')}",
                     f"{gate['diff']:+.5g} ({gate['diff_pct']:+.2f}%), 95% interval "
                     f"[{gate['low']:+.5g}, {gate['high']:+.5g}] on {gate['shared_images']} held-out images"))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if metrics.get("verdict"):
        lines += ["", f"Verdict: {metrics['verdict']}."]
    return lines


def render_card(
    info: RunInfo,
    *,
    repo_id: str,
    license: str = DEFAULT_LICENSE,
    has_loss_plot: bool = False,
    has_grid: bool = False,
) -> str:
    """The full ``README.md`` text (front matter + body)."""
    meta = card_metadata(info, license=license)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    base = info.base_model if is_hub_id(info.base_model) else SD15_HUB_ID
    trigger = info.trigger_word
    example = f"{trigger}, 1girl, anime watercolor style, masterpiece" if trigger else \
        "1girl, anime watercolor style, masterpiece"
    kohya = info.kohya_file.name if info.kohya_file else None
    kohya_stem = info.kohya_file.stem if info.kohya_file else info.run_name

    out: list[str] = ["---", front.rstrip(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    if is_test_model(info.trained_on):
        out += ["> **Test artefact, not a usable LoRA.** It was trained on animelora's tiny "
                "random-weight test model (`--model tiny`), not on Stable Diffusion 1.5: it "
                "loads only into that test model and its images are noise.", ""]
    out.append(f"An anime-style LoRA for Stable Diffusion 1.5, trained by the `animelora` "
               f"pipeline (run `{info.run_name}`).")
    if info.base_model and not is_hub_id(info.base_model):
        name = model_display_name(info.base_model)
        out.append(f"Base model: `{name}`, a local checkpoint that is not on the Hugging Face "
                   f"Hub. The examples below load `{SD15_HUB_ID}` in its place; load your copy "
                   f"of `{name}` instead for results like the samples.")
    else:
        out.append(f"Base model: [`{base}`](https://huggingface.co/{base}).")
    if trigger:
        out += ["", f"Trigger word: `{trigger}` (put it first in the prompt)."]
    out.append("")

    if has_grid:
        out += ["## Samples", "",
                "Base model (first column) against this LoRA at the same prompts and seeds:", "",
                f"![samples grid]({IN_REPO.samples_grid.as_posix()})", ""]

    out += ["## Use with diffusers", "", "```python", "import torch",
            "from diffusers import StableDiffusionPipeline", "",
            "pipe = StableDiffusionPipeline.from_pretrained(",
            f'    "{base}", torch_dtype=torch.float16', ').to("cuda")']
    if info.has_diffusers_file or not kohya:
        out.append(f'pipe.load_lora_weights("{repo_id}", weight_name="{DIFFUSERS_WEIGHTS}")')
    else:
        out.append(f'pipe.load_lora_weights("{repo_id}", weight_name="{kohya}")')
    out += ["image = pipe(", f'    "{example}",',
            '    negative_prompt="lowres, bad anatomy, bad hands, worst quality, low quality",',
            "    num_inference_steps=25, guidance_scale=7.0,",
            '    cross_attention_kwargs={"scale": 0.8},  # LoRA strength',
            ").images[0]", 'image.save("sample.png")', "```", ""]

    out += ["## Use with AUTOMATIC1111 / ComfyUI", ""]
    if kohya:
        out += [f"1. Download `{kohya}` (kohya format, with `ss_*` and `modelspec.*` metadata). "
                f"`{DIFFUSERS_WEIGHTS}` is the diffusers-format copy and is not meant for these "
                "UIs.",
                "2. AUTOMATIC1111 / Forge: copy it into `stable-diffusion-webui/models/Lora/`, then "
                f"add `<lora:{kohya_stem}:0.8>` to the prompt, e.g. "
                f"`{example}, <lora:{kohya_stem}:0.8>`.",
                "3. ComfyUI: copy it into `ComfyUI/models/loras/` and pick it in a "
                "**Load LoRA** node (strength 0.8) between the checkpoint loader and the sampler.",
                ""]
    else:
        out += [f"This repository holds only `{DIFFUSERS_WEIGHTS}`, the diffusers-format file; "
                "AUTOMATIC1111 and ComfyUI need the kohya-format file (`<run>.safetensors`), "
                "which this upload does not include.", ""]

    out += ["## Training settings", "", "| setting | value |", "|---|---|"]
    for key, value in info.settings.items():
        out.append(f"| {key} | {_fmt(value)} |")
    out.append("")

    out += ["## Data set", ""]
    out.append(f"- name: {info.dataset or '-'}")
    out.append(f"- version: {info.dataset_version or '-'}")
    out.append(f"- images: {info.dataset_size if info.dataset_size is not None else '-'}")
    out += [f"- source: {info.data_source}", ""]

    if info.metrics:
        out += ["## Metrics", ""] + _metrics_section(info.metrics) + [""]
    if has_loss_plot:
        out += ["## Loss curve", "", f"![loss curve]({IN_REPO.loss_plot.as_posix()})", ""]
    out += ["## License", "",
            f"`{license}`. Respect the rights of the artists whose images were used for training.",
            ""]
    return "\n".join(out)
