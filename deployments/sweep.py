"""`sweep/phase2a-lr-rank`: the guide's Phase 2A question answered by measurement, and
`sweep-candidate/train`: one candidate's rung, the unit a sweep's workers train in parallel.

The guide moved from Phase 1.5 (lr 1e-4, rank 8) to Phase 2A (lr 5e-5, rank 16, alpha 64) by a
guess; this deployment trains that 2 x 2 grid on one data-set version, stops recipes that are
clearly worse at the end of epochs 5 and 10, and names the best with its interval. Override the
grid, the rungs or the shared settings in the UI or with
`prefect deployment run sweep/phase2a-lr-rank -p dataset=anime -p grid='{"lora_rank": [8, 16, 32]}'`.

A sweep run from a deployment submits each rung's candidates as runs of `sweep-candidate/train`
together; every worker (or `animelora serve` host) that has it trains one, each segment under the
`gpu` limit. Serve or deploy both, on the same work pool or the candidates on the GPU pool.
"""
from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from flows.sweep import CANDIDATE_DEPLOYMENT, sweep, sweep_candidate

PHASE2A_GRID: dict = {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}


def candidate_deployment(name: str = CANDIDATE_DEPLOYMENT.split("/", 1)[1]) -> RunnerDeployment:
    """The deployment a sweep's candidates run as (``name``: another one for a second pool or a test)."""
    return sweep_candidate.to_deployment(
        name=name,
        description="One sweep candidate trained to one rung (train-segment tasks under the gpu "
                    "limit); started by the sweep flow, which awaits it and reads the run folder",
        tags=["animelora", "training", "sweep"],
    )


def sweep_deployments() -> list[RunnerDeployment]:
    return [sweep.to_deployment(
        name="phase2a-lr-rank",
        parameters={"preset": "phase2a", "name": "phase2a-sweep", "grid": PHASE2A_GRID},
        description="Phase 2A's learning rate x rank, measured: train the grid (the candidates at "
                    "once on the workers of sweep-candidate/train), prune the clearly worse at "
                    "epochs 5 and 10, name the best with a 95% interval",
        tags=["animelora", "training", "sweep"],
    ), candidate_deployment()]
