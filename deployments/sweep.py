"""`sweep/phase2a-lr-rank`: the guide's Phase 2A question answered by measurement.

The guide moved from Phase 1.5 (lr 1e-4, rank 8) to Phase 2A (lr 5e-5, rank 16, alpha 64) by a
guess; this deployment trains that 2 x 2 grid on one data-set version, stops recipes that are
clearly worse at the end of epochs 5 and 10, and names the best with its interval. Override the
grid, the rungs or the shared settings in the UI or with
`prefect deployment run sweep/phase2a-lr-rank -p dataset=anime -p grid='{"lora_rank": [8, 16, 32]}'`.
"""
from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from flows.sweep import sweep

PHASE2A_GRID: dict = {"learning_rate": [1e-4, 5e-5], "lora_rank": [8, 16]}


def sweep_deployments() -> list[RunnerDeployment]:
    return [sweep.to_deployment(
        name="phase2a-lr-rank",
        parameters={"preset": "phase2a", "name": "phase2a-sweep", "grid": PHASE2A_GRID},
        description="Phase 2A's learning rate x rank, measured: train the grid, prune the clearly "
                    "worse at epochs 5 and 10, name the best with a 95% interval",
        tags=["animelora", "training", "sweep"],
    )]
