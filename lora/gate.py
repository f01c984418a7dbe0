"""The publish gate: the guide's rule "upload if it improved", made measurable.

The run must beat the compared run (or, with none, the base model: its own step-0 validation)
on the held-out images both were scored on, paired image by image, with the 95% bootstrap
interval of the difference below 0 (lora/analysis/paired.py). Logs without per-image losses
fall back to the final validation loss, then to the training-loss improvement (noisy signals,
said so in the reason).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from lora.analysis.metrics import RunAnalysis


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


def _val(metrics: Mapping[str, Any], key: str) -> float | None:
    validation = metrics.get("validation") or {}
    value = validation.get(key) if isinstance(validation, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else None


def gate_comparison(analysis: "RunAnalysis", compared: "RunAnalysis | None" = None) -> dict[str, Any] | None:
    """The paired comparison the gate decides on, as a dict with ``against`` naming the other
    side: the compared run when there is one, else the run's base model (step 0)."""
    from lora.analysis.paired import paired_compare

    if compared is not None:
        pair = paired_compare(analysis.final_scores, compared.final_scores)
        against = f"compared run {compared.name}"
    else:
        pair = analysis.vs_base
        against = "base model (step 0)"
    if pair is None:
        return None
    return {**pair.to_dict(), "against": against}


def publish_gate(
    metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None = None
) -> GateDecision:
    """Decide whether a run is worth publishing.

    ``metrics`` and ``baseline`` are analysis dictionaries (``RunAnalysis.to_dict()``);
    ``metrics["gate_comparison"]`` (from :func:`gate_comparison`) decides when it is usable.
    Otherwise: with a baseline run the new run must beat its final validation loss; without
    one the run's own validation loss must have fallen from its first to its last evaluation.
    """
    paired = metrics.get("gate_comparison")
    fallback_note = ""
    if isinstance(paired, Mapping) and paired.get("status") == "ok":
        better = isinstance(paired.get("high"), (int, float)) and paired["high"] < 0
        figure = (f"{paired['diff']:+.5g} ({paired['diff_pct']:+.2f}%), 95% interval "
                  f"[{paired['low']:+.5g}, {paired['high']:+.5g}] on {paired['shared_images']} "
                  "shared held-out images")
        return GateDecision(
            better,
            f"validation loss vs the {paired.get('against', 'compared run')}: {figure}; "
            + ("lower, with the interval below 0" if better else "not shown lower (the interval is not below 0)"),
        )
    if isinstance(paired, Mapping) and paired.get("message"):
        fallback_note = f" (not paired: {paired['message']})"
    decision = _unpaired_gate(metrics, baseline)
    return GateDecision(decision.passed, decision.reason + fallback_note)


def _unpaired_gate(metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> GateDecision:
    """The gate for logs without per-image validation losses (means, possibly other images)."""
    final = _val(metrics, "final_loss")
    if baseline is not None:
        base_final = _val(baseline, "final_loss")
        if final is not None and base_final is not None:
            better = final < base_final
            return GateDecision(
                better,
                f"validation loss {final:.5f} {'<' if better else '>='} {base_final:.5f} "
                f"of the compared run",
            )
        ours, theirs = metrics.get("improvement_pct"), baseline.get("improvement_pct")
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
            better = ours > theirs
            return GateDecision(
                better,
                f"no validation loss on both runs; training-loss improvement {ours:.1f}% "
                f"{'>' if better else '<='} {theirs:.1f}% of the compared run (noisy signal)",
            )
        return GateDecision(False, "the runs have no comparable loss figures")
    initial = _val(metrics, "initial_loss")
    if final is not None and initial is not None:
        better = final < initial
        return GateDecision(
            better,
            f"validation loss went from {initial:.5f} to {final:.5f} "
            f"({'improved' if better else 'did not improve'})",
        )
    ours = metrics.get("improvement_pct")
    if isinstance(ours, (int, float)):
        return GateDecision(
            ours > 0, f"no validation loss; training-loss improvement {ours:.1f}% (noisy signal)"
        )
    return GateDecision(False, "the run has no loss figures to judge")
