"""Which candidates go on after a rung, and which recipe is best at the end.

The rule (hand-written successive halving, not Optuna's pruners): after each rung every live
candidate is compared with the rung's best (the lowest mean validation loss) on the data set's
held-out images, paired image by image and timestep by timestep with the project's 95%
bootstrap interval (lora/analysis/paired.py). A candidate whose whole interval lies above 0
(clearly worse than the best) stops there; every other one goes on, however many that is.

Why not a fixed fraction per rung, as Optuna's SuccessiveHalvingPruner or Hyperband keep: a
fixed fraction prunes recipes that are not distinguishable from the best, which can hide the
winner when validation is noisy (few held-out images); here a recipe stops only on evidence.
Why not Optuna's other pruners: they compare one number per trial and step (a mean) without
the pairing by image that removes most of the noise, and a sweep is a small grid, not a search
over a space that needs a sampler.

One candidate is compared with the best of the same rung; with many candidates the best is
the luckiest of several, so a small share of "clearly worse" calls near the boundary are
chance. The reported interval says how near.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from lora.analysis.paired import PairedComparison, Scores, paired_compare


@dataclass(frozen=True)
class RungDecision:
    """One rung: the scores' means, the best, each other candidate against it, who stops."""

    rung: int
    epoch: int | None  # None: the end of each candidate's run
    means: dict[str, float]
    best: str | None
    vs_best: dict[str, PairedComparison] = field(default_factory=dict)
    pruned: tuple[str, ...] = ()
    unscored: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"rung": self.rung, "epoch": self.epoch, "means": dict(self.means), "best": self.best,
                "vs_best": {k: v.to_dict() for k, v in self.vs_best.items()},
                "pruned": list(self.pruned), "unscored": list(self.unscored)}


def clearly_worse(pair: PairedComparison) -> bool:
    """``pair`` is candidate minus best: the candidate is clearly worse when the interval is above 0."""
    return pair.ok and pair.low is not None and pair.low > 0


def judge_rung(rung: int, epoch: int | None, scores: Mapping[str, Scores | None]) -> RungDecision:
    """Compare every scored candidate with the rung's best and name the clearly worse.

    Candidates without per-image scores (nothing to pair) are never pruned: the rule prunes
    on evidence only; they are listed as ``unscored``.
    """
    scored = {name: s for name, s in scores.items() if s is not None}
    unscored = tuple(name for name, s in scores.items() if s is None)
    if not scored:
        return RungDecision(rung, epoch, {}, None, unscored=unscored)
    means = {name: s.mean for name, s in scored.items()}
    best = min(scored, key=lambda n: (means[n], n))
    vs_best = {name: paired_compare(s, scored[best]) for name, s in scored.items() if name != best}
    pruned = tuple(name for name, pair in vs_best.items() if clearly_worse(pair))
    return RungDecision(rung, epoch, means, best, vs_best, pruned, unscored)


def tie_groups(order: list[str], scores: Mapping[str, Scores]) -> list[list[str]]:
    """"Not distinguishable" groups, best first: each group is led by the lowest mean not yet
    grouped and holds the candidates whose interval against that leader holds 0.

    ``order`` is the candidates sorted by mean loss, lowest first."""
    groups: list[list[str]] = []
    left = list(order)
    while left:
        leader, rest = left[0], left[1:]
        group = [leader] + [n for n in rest
                            if paired_compare(scores[n], scores[leader]).verdict == "not distinguishable"]
        groups.append(group)
        left = [n for n in rest if n not in group]
    return groups
