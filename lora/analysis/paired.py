"""Paired comparison of two runs' validation losses, with a 95% bootstrap interval.

Why paired: most of the spread in validation loss is between images (some are simply harder to
denoise), not between runs. Comparing two means over *different* images mostly compares the
images; comparing the same image at the same timestep and noise under both runs removes that
and leaves the effect of the runs. The interval comes from resampling the shared images (the
unit that varies), with a fixed seed so a report reads the same every time it is rebuilt.

Inputs are :class:`Scores`: per-image, per-timestep losses of one run at one step, read from a
``training_log.json`` validation record (``per_image``, written since step-0 validation was
added) or produced by re-scoring an exported LoRA (lora/analysis/rescore.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

#: Fewer shared held-out images than this and an interval means nothing: say so instead.
MIN_SHARED_IMAGES = 3
BOOTSTRAP_SAMPLES = 4000
BOOTSTRAP_SEED = 20240605
CONFIDENCE = 0.95

OK = "ok"
TOO_FEW = "too-few-images"
DIFFERENT_BASE = "different-base-models"
NO_SCORES = "no-per-image-losses"


@dataclass(frozen=True)
class Scores:
    """Validation losses of one model state: ``per_image[name][timestep] = loss``."""

    label: str
    per_image: dict[str, dict[str, float]]
    step: int | None = None
    base_model: str | None = None

    @property
    def mean(self) -> float:
        values = [v for losses in self.per_image.values() for v in losses.values()]
        return float(sum(values) / len(values)) if values else float("nan")


def _record_scores(record: Mapping[str, Any], label: str, base_model: str | None) -> Scores | None:
    per_image = record.get("per_image")
    timesteps = record.get("timesteps")
    if not isinstance(per_image, Mapping) or not per_image or not isinstance(timesteps, list):
        return None
    out: dict[str, dict[str, float]] = {}
    for name, losses in per_image.items():
        if isinstance(losses, list) and len(losses) == len(timesteps):
            out[str(name)] = {str(t): float(v) for t, v in zip(timesteps, losses)}
    if not out:
        return None
    step = record.get("step")
    return Scores(label, out, int(step) if isinstance(step, (int, float)) else None, base_model)


def scores_from_log(log: Mapping[str, Any], name: str, which: str = "final") -> Scores | None:
    """A run's scores from its raw log: ``which`` = "final" (the last record with per-image
    losses) or "base" (step 0: the base model, the LoRA still at zero)."""
    records = [r for r in (log.get("validation") or []) if isinstance(r, Mapping)]
    base_model = log.get("base_model") if isinstance(log.get("base_model"), str) else None
    if which == "base":
        for record in records:
            if record.get("step") == 0:
                return _record_scores(record, f"{name} base model (step 0)", base_model)
        return None
    for record in reversed(records):
        if record.get("step") != 0:
            found = _record_scores(record, name, base_model)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class PairedComparison:
    """``a`` minus ``b`` on the images and timesteps both were scored on.

    ``diff`` < 0 means ``a`` has the lower (better) loss. ``low``/``high``: the 95% bootstrap
    interval over images; ``*_pct``: the same relative to ``b``'s mean on the shared images.
    """

    a: str
    b: str
    status: str
    message: str
    shared_images: int = 0
    timesteps: tuple[str, ...] = ()
    mean_a: float | None = None
    mean_b: float | None = None
    diff: float | None = None
    low: float | None = None
    high: float | None = None
    diff_pct: float | None = None
    low_pct: float | None = None
    high_pct: float | None = None
    per_timestep: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def verdict(self) -> str:
        """"a better" | "b better" | "not distinguishable" | the status when not comparable."""
        if not self.ok:
            return self.status
        if self.high is not None and self.high < 0:
            return "a better"
        if self.low is not None and self.low > 0:
            return "b better"
        return "not distinguishable"

    @property
    def better(self) -> str | None:
        """The label of the run with the lower loss when the interval excludes 0, else None."""
        return {"a better": self.a, "b better": self.b}.get(self.verdict)

    def figure(self) -> str:
        """``-0.00123 (-1.2%), 95% interval [-0.002, -0.0004]`` (or the reason there is none)."""
        if not self.ok:
            return self.message
        return (f"{self.diff:+.5g} ({self.diff_pct:+.2f}%), 95% interval "
                f"[{self.low:+.5g}, {self.high:+.5g}] ([{self.low_pct:+.2f}%, {self.high_pct:+.2f}%])")

    def sentence(self) -> str:
        """One line a reader can act on."""
        if not self.ok:
            return f"{self.a} vs {self.b}: {self.message}"
        verdict = self.verdict
        if verdict == "not distinguishable":
            what = "not distinguishable (the interval holds 0)"
        else:
            what = f"{self.better} has the lower loss"
        return (f"{self.a} vs {self.b}: {what}; difference {self.figure()} on {self.shared_images} "
                f"shared held-out images x {len(self.timesteps)} timesteps")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timesteps"] = list(self.timesteps)
        data["verdict"] = self.verdict
        data["better"] = self.better
        data["text"] = self.sentence()
        return data


def _small_sample_factor(n: int) -> float:
    """How much wider than the plain percentile interval a bootstrap over ``n`` images must be.

    Why: resampling a handful of images underestimates the spread of their mean (by
    sqrt((n-1)/n)) and uses the normal quantile where Student's t applies, so with 4 images a
    plain percentile interval is about half as wide as it should be and two seeds of one recipe
    look different. Widening by t(n-1)/z * sqrt(n/(n-1)) (the "expanded" percentile bootstrap)
    fixes that and tends to 1 as n grows (1.06 at 30 images)."""
    if n < 2:
        return 1.0
    from scipy.stats import norm, t

    q = 1 - (1 - CONFIDENCE) / 2
    return float(t.ppf(q, n - 1) / norm.ppf(q) * np.sqrt(n / (n - 1)))


def _interval(values: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    means = values[idx].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    centre = float(values.mean())
    factor = _small_sample_factor(len(values))
    return centre - (centre - float(low)) * factor, centre + (float(high) - centre) * factor


def _data_set_advice(min_images: int) -> str:
    """How a data set comes to hold out ``min_images`` images (at the default held-out share)."""
    from lora.data.split import DEFAULT_FRACTION, SPLIT_FILE, held_out_target

    n = min_images
    while held_out_target(n, DEFAULT_FRACTION) < min_images:
        n += 1
    return (f"add images to it (it holds out {DEFAULT_FRACTION:.0%} of them unless its {SPLIT_FILE} "
            f"says otherwise: {n} images or more hold out {min_images})")


def _too_few_message(a: Scores, b: Scores, shared: int, min_images: int) -> str:
    """Why there is no interval, and what helps.

    Why two messages: when both sides were scored on the same images (a run and its own step 0,
    runs of one data set, a re-score) the data set simply holds out too few images, and only a
    larger data set helps; re-scoring would score the same few images again. Only runs scored
    on different images gain from ``--rescore``, which scores them on one common set."""
    if set(a.per_image) == set(b.per_image):
        return (f"only {shared} held-out image(s), too few for an interval (need {min_images}): "
                f"the data set holds out too few images; {_data_set_advice(min_images)}")
    return (f"only {shared} shared held-out image(s) (need {min_images}): the runs were validated "
            "on different images; re-score them on one common held-out set with --rescore")


def paired_compare(a: Scores | None, b: Scores | None, *, min_images: int = MIN_SHARED_IMAGES,
                   samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> PairedComparison:
    """Compare ``a`` with ``b`` image by image and timestep by timestep (see the module doc)."""
    a_label = a.label if a is not None else "first run"
    b_label = b.label if b is not None else "second run"
    if a is None or b is None:
        missing = ", ".join(label for s, label in ((a, a_label), (b, b_label)) if s is None)
        return PairedComparison(a_label, b_label, NO_SCORES,
                                f"no per-image validation losses for {missing} (a log from before "
                                "they were recorded): re-score the exported LoRAs with --rescore")
    if a.base_model and b.base_model and a.base_model != b.base_model:
        return PairedComparison(a_label, b_label, DIFFERENT_BASE,
                                f"different base models ({a.base_model} vs {b.base_model}): their "
                                "losses are not comparable")
    shared = sorted(set(a.per_image) & set(b.per_image))
    timesteps = sorted(set.intersection(*(set(a.per_image[n]) & set(b.per_image[n]) for n in shared))
                       if shared else set(), key=lambda t: (len(t), t))
    if len(shared) < min_images or not timesteps:
        return PairedComparison(a_label, b_label, TOO_FEW, _too_few_message(a, b, len(shared), min_images),
                                shared_images=len(shared), timesteps=tuple(timesteps))
    la = np.array([[a.per_image[n][t] for t in timesteps] for n in shared], dtype=np.float64)
    lb = np.array([[b.per_image[n][t] for t in timesteps] for n in shared], dtype=np.float64)
    d = la - lb  # images x timesteps
    per_image = d.mean(axis=1)
    idx = np.random.default_rng(seed).integers(0, len(shared), size=(samples, len(shared)))
    low, high = _interval(per_image, idx)
    mean_b = float(lb.mean())
    scale = 100.0 / mean_b if mean_b else float("nan")
    per_t: dict[str, dict[str, float]] = {}
    for j, t in enumerate(timesteps):
        t_low, t_high = _interval(d[:, j], idx)
        per_t[t] = {"diff": float(d[:, j].mean()), "low": t_low, "high": t_high}
    diff = float(per_image.mean())
    result = PairedComparison(
        a_label, b_label, OK, "", len(shared), tuple(timesteps), float(la.mean()), mean_b, diff, low,
        high, diff * scale, low * scale, high * scale, per_t,
    )
    return result


def relative_noise_pct(first: Scores | None, last: Scores | None) -> float | None:
    """Half the width of the 95% interval of ``last`` vs ``first``, in percent of ``first``: the
    measured noise of a change in this run's validation loss (None without per-image losses)."""
    if first is None or last is None:
        return None
    result = paired_compare(last, first, min_images=MIN_SHARED_IMAGES)
    if not result.ok or result.low_pct is None or result.high_pct is None:
        return None
    width = (result.high_pct - result.low_pct) / 2
    return width if math.isfinite(width) else None


def pick_best(labels: Sequence[str], pairs: Sequence[PairedComparison]) -> str | None:
    """The run that has the lower loss than every other run with an interval excluding 0."""
    for label in labels:
        others = [p for p in pairs if label in (p.a, p.b)]
        if others and all(p.better == label for p in others):
            return label
    return None
