"""Seeds derived from (run seed, purpose, counter).

Why: every random draw of a step (timesteps, noise, flips, caption order, dropout) comes
from a generator seeded by the run seed and the global step, and every epoch's data order
from the run seed and the epoch. So what a step does depends only on its number, never on
how many times the run was interrupted before it.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str, counter: int = 0) -> int:
    """A 63-bit seed that differs for every (seed, purpose, counter)."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{counter}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, counter: int = 0) -> torch.Generator:
    """A CPU generator (draws are device-independent; tensors are moved afterwards)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, purpose, counter))
