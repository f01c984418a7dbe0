"""Checkpoints: their layout on disk (:mod:`.files`) and the typed state they hold (:mod:`.state`).

No other module reads or writes a checkpoint's files: the run asks this package for the newest
intact checkpoint, loads it as a :class:`CheckpointData` and writes the next one.
"""
from .files import (CheckpointData, CheckpointWriteError, clean_temporaries, latest_valid, list_checkpoints,
                    load_checkpoint, prune, rng_restore, step_of, verify, write_checkpoint, write_json_atomic)
from .state import RunState

__all__ = ["CheckpointData", "CheckpointWriteError", "RunState", "clean_temporaries", "latest_valid",
           "list_checkpoints", "load_checkpoint", "prune", "rng_restore", "step_of", "verify", "write_checkpoint",
           "write_json_atomic"]
