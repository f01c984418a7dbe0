"""Loss metrics and verdicts, in the spirit of the blog guide's own analysis.

The guide judged runs by initial, minimum and final epoch loss, the improvement
``(initial - final) / initial * 100``, and spikes such as "+30% at epoch 4". Epoch-mean training
loss with random timesteps moves a few percent by chance, so the verdict only calls a change
"improving" or "rising" past a tolerance, and prefers the validation loss (fixed timesteps and
noise) when the log has it.

The tolerance differs by series. Training loss uses ±2% (its own noise). Validation loss is
10-18x steadier, so its tolerance is measured from the run itself: half the width of the 95%
bootstrap interval of the paired change from the first to the last evaluation (per-image losses,
lora/analysis/paired.py), or, for older logs without them, twice the jitter of the series around
its own trend (:func:`series_noise_pct`). The guide's improvement % stays as it is, as the guide's metric.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora.analysis.log import TrainingLog, load_log, parse_log, resolve_log_path
from lora.analysis.paired import PairedComparison, Scores, paired_compare, relative_noise_pct, scores_from_log
from lora.runpaths import LOG_FILE

# Below this many percent of change the loss is flat (the guide's runs moved about ±4%).
PLATEAU_PCT = 2.0
# A rise from the minimum to the end above this many percent counts as "rising".
RISE_PCT = 3.0
# Smoothing factor of the exponential moving average (weight of the newest point).
EMA_ALPHA = 0.5
# The validation tolerance never drops below this (float noise of a perfectly flat series).
MIN_VALIDATION_NOISE_PCT = 0.02


@dataclass(frozen=True)
class Spike:
    """An epoch whose loss jumped above the previous epoch's by more than the threshold."""

    epoch: int
    jump_pct: float
    loss: float
    previous_loss: float


@dataclass(frozen=True)
class SeriesMetrics:
    """Metrics of one loss series (training epochs, or validation evaluations)."""

    epochs: tuple[int | None, ...]
    values: tuple[float, ...]
    smoothed: tuple[float, ...]
    initial_loss: float
    min_loss: float
    min_epoch: int | None
    final_loss: float
    improvement_pct: float
    spikes: tuple[Spike, ...]
    trend: str  # improving | plateau | rising | diverged | too-short
    verdict: str
    rising_after_epoch: int | None = None
    diverged_epoch: int | None = None
    steps: tuple[int | None, ...] = ()
    per_timestep_initial: dict[str, float] = field(default_factory=dict)
    per_timestep_final: dict[str, float] = field(default_factory=dict)
    #: the ± percentage below which a change counts as noise, and how it was obtained
    noise_pct: float = PLATEAU_PCT
    noise_source: str = "training-loss threshold"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "initial_loss": self.initial_loss,
            "min_loss": self.min_loss,
            "min_epoch": self.min_epoch,
            "final_loss": self.final_loss,
            "improvement_pct": round(self.improvement_pct, 3),
            "spikes": [{"epoch": s.epoch, "jump_pct": round(s.jump_pct, 2)} for s in self.spikes],
            "smoothed": [round(v, 8) for v in self.smoothed],
            "trend": self.trend,
            "verdict": self.verdict,
            "rising_after_epoch": self.rising_after_epoch,
            "diverged_epoch": self.diverged_epoch,
            "noise_pct": round(self.noise_pct, 4),
            "noise_source": self.noise_source,
        }
        if self.per_timestep_final:
            data["per_timestep_initial"] = dict(self.per_timestep_initial)
            data["per_timestep_final"] = dict(self.per_timestep_final)
        return data


@dataclass(frozen=True)
class RunAnalysis:
    """The analysis of one run: training-loss metrics, validation metrics when logged."""

    name: str
    source: str | None
    training: SeriesMetrics
    validation: SeriesMetrics | None
    losses: tuple[dict[str, Any], ...]
    validation_points: tuple[dict[str, Any], ...]
    settings: dict[str, Any]
    spike_threshold_pct: float
    derived_from_steps: bool = False
    #: per-image validation losses at the last evaluation and at step 0 (the base model)
    final_scores: Scores | None = None
    base_scores: Scores | None = None

    @property
    def vs_base(self) -> PairedComparison | None:
        """The run against its own base model (step 0), paired on its held-out images."""
        if self.final_scores is None and self.base_scores is None:
            return None
        return paired_compare(self.final_scores, self.base_scores)

    # The guide's figures, read straight off the training series.
    @property
    def initial_loss(self) -> float:
        return self.training.initial_loss

    @property
    def min_loss(self) -> float:
        return self.training.min_loss

    @property
    def min_epoch(self) -> int | None:
        return self.training.min_epoch

    @property
    def final_loss(self) -> float:
        return self.training.final_loss

    @property
    def improvement_pct(self) -> float:
        return self.training.improvement_pct

    @property
    def spikes(self) -> tuple[Spike, ...]:
        return self.training.spikes

    @property
    def verdict(self) -> str:
        """Training-loss verdict, with the validation verdict after it when logged."""
        text = self.training.verdict
        if self.validation is not None:
            text += f". Validation loss: {self.validation.verdict}"
        return text

    @property
    def total_time_seconds(self) -> float | None:
        times = [row.get("time_seconds") for row in self.losses]
        times = [t for t in times if isinstance(t, (int, float))]
        if not times:
            return None
        # The guide logs cumulative seconds; a per-epoch log would decrease somewhere.
        return float(times[-1]) if times == sorted(times) else float(sum(times))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``animelora analyze --json`` and ``report/metrics.json``."""
        train = self.training.to_dict()
        data: dict[str, Any] = {"name": self.name, "source": self.source}
        data.update({k: train[k] for k in ("initial_loss", "min_loss", "min_epoch", "final_loss",
                                           "improvement_pct", "spikes", "smoothed", "trend",
                                           "rising_after_epoch", "diverged_epoch")})
        data["verdict"] = self.verdict
        data["training_verdict"] = self.training.verdict
        data["epochs_logged"] = len(self.losses)
        data["spike_threshold_pct"] = self.spike_threshold_pct
        data["total_time_seconds"] = self.total_time_seconds
        data["losses"] = [dict(row) for row in self.losses]
        data["settings"] = dict(self.settings)
        data["derived_from_steps"] = self.derived_from_steps
        data["improvement_pct_label"] = "the guide's metric: training-loss improvement, first to last epoch"
        vs_base = self.vs_base
        data["vs_base_model"] = vs_base.to_dict() if vs_base is not None else None
        if self.validation is not None:
            val = self.validation.to_dict()
            val["points"] = [dict(p) for p in self.validation_points]
            data["validation"] = val
        else:
            data["validation"] = None
        return data


def ema(values: Sequence[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Exponential moving average: a trend line that follows the loss with little lag."""
    out: list[float] = []
    for value in values:
        out.append(value if not out else alpha * value + (1 - alpha) * out[-1])
    return out


def find_spikes(
    epochs: Sequence[int | None], values: Sequence[float], threshold_pct: float
) -> list[Spike]:
    """Epoch-to-epoch jumps above ``threshold_pct`` percent (the guide's "+30% at epoch 4")."""
    spikes = []
    for i in range(1, len(values)):
        prev, cur = values[i - 1], values[i]
        if prev > 0 and math.isfinite(prev) and math.isfinite(cur):
            jump = (cur - prev) / prev * 100.0
            if jump > threshold_pct:
                epoch = epochs[i] if epochs[i] is not None else i + 1
                spikes.append(Spike(epoch=int(epoch), jump_pct=jump, loss=cur, previous_loss=prev))
    return spikes


def _slope(values: Sequence[float]) -> float:
    """Least-squares slope per point, to tell a sustained rise from one noisy epoch."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def _pct(value: float) -> str:
    return f"{value:+.1f}%"


def _amount(pct: float) -> str:
    """An unsigned percentage with enough digits to never read 0.0% for a change that counted:
    validation loss moves by hundredths of a percent, training loss by whole ones."""
    value = abs(pct)
    if value >= 1:
        return f"{value:.1f}%"
    if value >= 0.001:
        return f"{value:.2g}%"
    return "less than 0.001%"


def _moved(improvement: float) -> str:
    """``fell 1.3%`` / ``rose 1.3%``: the direction in words (``improvement`` > 0 is a fall)."""
    if abs(improvement) < 0.001:
        return "did not move"
    return f"{'fell' if improvement > 0 else 'rose'} {_amount(improvement)}"


def _judge(
    label: str,
    epochs: Sequence[int | None],
    values: Sequence[float],
    smoothed: Sequence[float],
    improvement: float,
    min_index: int,
    noise_pct: float = PLATEAU_PCT,
    noise_source: str = "",
) -> tuple[str, str, int | None]:
    """(trend, verdict text, rising-after epoch) for a finite series.

    ``noise_pct``: changes within ± this are noise (training loss: the fixed ±2%; validation
    loss: measured, see the module docstring); a rise must pass the larger of it and RISE_PCT
    for training loss, and the measured noise for validation loss."""
    rise_threshold = RISE_PCT if label == "training" else noise_pct
    n = len(values)
    unit = "epoch" if label == "training" else "evaluation"

    def at(i: int) -> str:
        return str(epochs[i]) if epochs[i] is not None else f"{unit} {i + 1}"

    if n < 2:
        return "too-short", f"only one {unit} logged: too short to judge", None
    min_loss, final = values[min_index], values[-1]
    rise_pct = (final - min_loss) / min_loss * 100.0 if min_loss > 0 else 0.0
    tail = list(values[min_index:])  # raw: the EMA still lags the fall before the minimum
    if min_index < n - 1 and rise_pct > rise_threshold and (len(tail) < 3 or _slope(tail) > 0):
        k = epochs[min_index]
        where = f"epoch {at(min_index)}" if epochs[min_index] is not None else at(min_index)
        advice = "likely learning rate too high or overfitting"
        if improvement > noise_pct:
            text = (f"improved {_amount(improvement)} overall but rising after {where}: {advice}; "
                    f"the best weights were at {where} ({min_loss:.5g})")
        else:
            text = (f"rising after {where}: {advice} (final loss {_amount(rise_pct)} above the "
                    f"minimum {min_loss:.5g}; {_amount(improvement)} "
                    f"{'worse' if improvement < 0 else 'better'} than the first {unit})")
        return "rising", text, (int(k) if k is not None else None)
    if improvement > noise_pct:
        last = list(smoothed[-3:])
        still = _slope(last) < 0 if len(last) >= 2 else True
        text = f"improving: loss fell {_amount(improvement)} from {values[0]:.5g} to {final:.5g}"
        text += ", still falling at the end" if still else ", flattening out at the end"
        return "improving", text, None
    if improvement < -noise_pct:
        return ("rising", f"rising: loss ended {_amount(improvement)} above the start: likely "
                f"learning rate too high", None)
    why = ", the noise of random-timestep training loss" if label == "training" else \
        f", the measured noise of this validation loss ({noise_source})"
    shown = f"{noise_pct:.1f}" if noise_pct >= 0.1 else f"{noise_pct:.2g}"
    return ("plateau", f"plateau: loss {_moved(improvement)} overall (within ±{shown}%{why});"
            " more epochs or a higher learning rate may help", None)


def series_metrics(
    epochs: Sequence[int | None],
    values: Sequence[float],
    *,
    spike_threshold_pct: float,
    label: str = "training",
    steps: Sequence[int | None] = (),
    noise_pct: float | None = None,
    noise_source: str | None = None,
) -> SeriesMetrics:
    """Metrics of one loss series; non-finite values mark where the run diverged."""
    diverged_at = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    finite_n = len(values) if diverged_at is None else diverged_at
    if finite_n == 0:
        epoch = epochs[0] if epochs else None
        nan = float("nan")
        return SeriesMetrics(
            epochs=tuple(epochs), values=tuple(values), smoothed=tuple(values),
            initial_loss=nan, min_loss=nan, min_epoch=None, final_loss=nan,
            improvement_pct=nan, spikes=(), trend="diverged",
            verdict=f"diverged: the {label} loss was not finite from the start: learning "
                    "rate far too high or broken data", diverged_epoch=epoch, steps=tuple(steps),
        )
    fin_epochs, fin_values = list(epochs[:finite_n]), list(values[:finite_n])
    smoothed = ema(fin_values)
    initial, final = fin_values[0], fin_values[-1]
    min_index = min(range(finite_n), key=lambda i: fin_values[i])
    improvement = (initial - final) / initial * 100.0 if initial else 0.0
    spikes = find_spikes(fin_epochs, fin_values, spike_threshold_pct)
    if noise_pct is None:
        if label == "training":
            noise_pct, noise_source = PLATEAU_PCT, "training-loss threshold"
        else:
            noise_pct, noise_source = series_noise_pct(fin_values), "jitter of the series around its trend"
    noise_source = noise_source or ""
    trend, verdict, rising_after = _judge(label, fin_epochs, fin_values, smoothed, improvement,
                                          min_index, noise_pct, noise_source)
    diverged_epoch = None
    if diverged_at is not None:
        diverged_epoch = epochs[diverged_at]
        trend = "diverged"
        verdict = (f"diverged: the {label} loss became NaN/inf at epoch {diverged_epoch}: "
                   f"learning rate too high; before that: {verdict}")
    if spikes:
        listed = ", ".join(f"{_pct(s.jump_pct)} at epoch {s.epoch}" for s in spikes)
        verdict += f"; spike{'s' if len(spikes) > 1 else ''}: {listed}"
    return SeriesMetrics(
        epochs=tuple(fin_epochs), values=tuple(fin_values), smoothed=tuple(smoothed),
        initial_loss=initial, min_loss=fin_values[min_index], min_epoch=fin_epochs[min_index],
        final_loss=final, improvement_pct=improvement, spikes=tuple(spikes), trend=trend,
        verdict=verdict, rising_after_epoch=rising_after, diverged_epoch=diverged_epoch,
        steps=tuple(steps[:finite_n]), noise_pct=noise_pct, noise_source=noise_source,
    )


def series_noise_pct(values: Sequence[float]) -> float:
    """Twice the jitter of a series around its own trend, in percent of its first value.

    The jitter is the standard deviation of the step-to-step changes around their mean
    change: a steady fall has none, however small the fall is; a loss going back and forth has
    as much as it moves.
    """
    if len(values) < 3 or not values[0]:
        return PLATEAU_PCT / 4
    diffs = [b - a for a, b in zip(values, values[1:])]
    mean = sum(diffs) / len(diffs)
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return max(MIN_VALIDATION_NOISE_PCT, 2 * spread / abs(values[0]) * 100.0)


def _default_name(log: TrainingLog, path: Path | None) -> str:
    run_name = log.settings.get("run_name")
    if isinstance(run_name, str) and run_name:
        return run_name
    if path is not None:
        if path.is_dir():
            return path.resolve().name
        # runs/<name>/training_log.json is named after its run; any other file after itself.
        return (path.resolve().parent.name or path.stem) if path.name == LOG_FILE \
            else path.stem
    return "run"


def analyze_log(
    log: Mapping[str, Any] | TrainingLog | Path | str,
    *,
    spike_threshold_pct: float = 30.0,
    name: str | None = None,
) -> RunAnalysis:
    """Analyze a training log (a dict, a ``training_log.json`` path or a run folder).

    Raises :class:`~lora.analysis.log.LogError` for a missing, empty or malformed log.
    """
    if spike_threshold_pct <= 0 or not math.isfinite(spike_threshold_pct):
        raise ValueError(f"spike_threshold_pct must be a positive number, got {spike_threshold_pct}")
    path: Path | None = None
    if isinstance(log, TrainingLog):
        parsed = log
    elif isinstance(log, (str, Path)):
        path = Path(log)
        file = resolve_log_path(path)
        parsed = parse_log(load_log(file), source=str(file))
    else:
        parsed = parse_log(log)
    training = series_metrics(
        [p.epoch for p in parsed.losses], [p.loss for p in parsed.losses],
        spike_threshold_pct=spike_threshold_pct,
    )
    run_name = name or _default_name(parsed, path)
    raw = parsed.raw if isinstance(parsed.raw, Mapping) else {}
    final_scores = scores_from_log(raw, run_name)
    base_scores = scores_from_log(raw, run_name, "base")
    validation = None
    if parsed.validation:
        points = parsed.validation
        first_scores = base_scores or _first_scores(raw, run_name)
        noise = relative_noise_pct(first_scores, final_scores)
        validation = series_metrics(
            [p.epoch for p in points], [p.loss for p in points],
            spike_threshold_pct=spike_threshold_pct, label="validation",
            steps=[p.step for p in points],
            noise_pct=None if noise is None else max(noise, MIN_VALIDATION_NOISE_PCT),
            noise_source=None if noise is None else "half the 95% interval of the paired change "
                                                    "on its held-out images",
        )
        validation = _with_timesteps(validation, points[0].per_timestep, points[-1].per_timestep)
    return RunAnalysis(
        name=run_name,
        source=parsed.source,
        training=training,
        validation=validation,
        losses=tuple({k: v for k, v in asdict(p).items() if v is not None}
                     for p in parsed.losses),
        validation_points=tuple({"step": p.step, "epoch": p.epoch, "loss": p.loss,
                                 "per_timestep": dict(p.per_timestep)}
                                for p in parsed.validation),
        settings=parsed.settings,
        spike_threshold_pct=spike_threshold_pct,
        derived_from_steps=parsed.derived_from_steps,
        final_scores=final_scores,
        base_scores=base_scores,
    )


def _first_scores(raw: Mapping[str, Any], name: str) -> Scores | None:
    """The first validation record with per-image losses (a log whose step 0 is missing)."""
    from lora.analysis.paired import _record_scores

    for record in raw.get("validation") or []:
        if isinstance(record, Mapping):
            found = _record_scores(record, name, None)
            if found is not None:
                return found
    return None


def _with_timesteps(
    metrics: SeriesMetrics, first: Mapping[str, float], last: Mapping[str, float]
) -> SeriesMetrics:
    from dataclasses import replace

    order = sorted(last, key=lambda t: (len(t), t))
    return replace(metrics, per_timestep_initial={t: first[t] for t in order if t in first},
                   per_timestep_final={t: last[t] for t in order})
