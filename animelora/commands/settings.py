"""Names of training settings as people type them: ``--set lr=1e-4`` means ``learning_rate``.

Why here and not in the config: the config rightly refuses names it does not know; what a
person needs on the command line is the name they meant. Short names that kohya, diffusers'
scripts and the README's preset table use are suggested (not accepted: a setting has one name,
so a config.json and a --set read the same), and anything else gets the closest real names.
"""
from __future__ import annotations

import difflib
from typing import Iterable

#: Short names people type for a setting -> the setting's name.
ALIASES = {
    "lr": "learning_rate",
    "rank": "lora_rank",
    "dim": "lora_rank",
    "network_dim": "lora_rank",
    "alpha": "lora_alpha",
    "network_alpha": "lora_alpha",
    "epoch": "epochs",
    "max_train_epochs": "epochs",
    "batch": "batch_size",
    "train_batch_size": "batch_size",
    "steps": "max_steps",
    "max_train_steps": "max_steps",
    "scheduler": "lr_scheduler",
    "warmup": "warmup_steps",
    "lr_warmup_steps": "warmup_steps",
    "dropout": "lora_dropout",
    "grad_accum": "gradient_accumulation",
    "gradient_accumulation_steps": "gradient_accumulation",
}


def suggestions(name: str, known: Iterable[str]) -> list[str]:
    """The settings ``name`` was probably meant as: its alias first, then close spellings."""
    names = sorted(set(known))
    found = [ALIASES[name]] if ALIASES.get(name) in names else []
    found += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in found]
    return found


def unknown_settings(keys: Iterable[str], known: Iterable[str]) -> str | None:
    """One line naming the first unknown ``--set`` key and what it may have meant; None when all
    keys are settings."""
    known = set(known)
    for key in keys:
        if key in known:
            continue
        close = suggestions(key, known)
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            "; the settings are the fields of a --config file (lora/config.py TrainConfig)"
        return f"--set {key}=...: unknown setting {key!r}{hint}"
    return None
