"""The publish gate: the guide's rule "upload if it improved", made measurable.

Training loss with random timesteps moves a few percent by chance, so the gate prefers the
validation loss (fixed timesteps and noise) and only falls back to the training-loss
improvement when a run has no validation records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


def _val(metrics: Mapping[str, Any], key: str) -> float | None:
    validation = metrics.get("validation") or {}
    value = validation.get(key) if isinstance(validation, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else None


def publish_gate(
    metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None = None
) -> GateDecision:
    """Decide whether a run is worth publishing.

    ``metrics`` and ``baseline`` are analysis dictionaries (``RunAnalysis.to_dict()``). With a
    baseline run the new run must beat its final validation loss; without one the run's own
    validation loss must have fallen from its first to its last evaluation.
    """
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
