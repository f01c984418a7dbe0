"""`train-lora/<preset>` deployments: one per preset of the Phase 2A guide.

Their defaults are per parameter group (flows/params.py): ``training.preset`` and
``data.target_size``; a run that passes a group keeps the fields it does not name from here.
"""
from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from flows.train_lora import train_lora

#: deployment name → (preset, images the data set must hold, description)
PRESET_DEPLOYMENTS: dict[str, tuple[str, int, str]] = {
    "phase1.5": ("phase1.5", 300, "The guide's first run: 10 epochs, batch 2, lr 1e-4, rank 8"),
    "phase2a": ("phase2a", 300, "Level 1: 20 epochs, batch 4, lr 5e-5, rank 16, alpha 64"),
    "phase2a-l2": ("phase2a-l2", 600, "Level 2: phase2a on a data set grown from 300 to 600 images"),
    "phase2b": ("phase2b", 600,
                "Level 3: cosine schedule, 500 warm-up steps, accumulation 2, grad clipping 1.0"),
}


def train_lora_deployments() -> list[RunnerDeployment]:
    return [
        train_lora.to_deployment(
            name=name,
            parameters={"data": {"target_size": target_size}, "training": {"preset": preset}},
            description=description,
            tags=["animelora", "training", preset],
        )
        for name, (preset, target_size, description) in PRESET_DEPLOYMENTS.items()
    ]
