"""Model card, staging and Hub publishing for a finished run (Prefect-free)."""
from __future__ import annotations

from lora.hub.card import TAGS, card_metadata, render_card
from lora.hub.licenses import HUB_LICENSES, check_license
from lora.hub.runinfo import RunInfo, gather
from lora.hub.stage import StageArgumentError, StagedFile, StageError, stage_run, staged_files
from lora.hub.upload import PublishArgumentError, PublishError, PublishResult, publish, resolve_token

__all__ = [
    "HUB_LICENSES", "PublishArgumentError", "PublishError", "PublishResult", "RunInfo",
    "StageArgumentError", "StageError", "StagedFile", "TAGS", "card_metadata", "check_license",
    "gather", "publish", "render_card", "resolve_token", "stage_run", "staged_files",
]
