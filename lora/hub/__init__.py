"""Model card, staging and Hub publishing for a finished run (Prefect-free)."""
from __future__ import annotations

from lora.hub.card import TAGS, card_metadata, render_card
from lora.hub.runinfo import RunInfo, gather
from lora.hub.stage import StagedFile, StageError, stage_run, staged_files
from lora.hub.upload import PublishError, PublishResult, publish, resolve_token

__all__ = [
    "PublishError", "PublishResult", "RunInfo", "StageError", "StagedFile", "TAGS",
    "card_metadata", "gather", "publish", "render_card", "resolve_token", "stage_run",
    "staged_files",
]
