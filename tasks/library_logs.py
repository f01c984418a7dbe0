"""Let the library's INFO lines (``lora.*`` loggers) reach a flow run's logs in the UI.

PREFECT_LOGGING_EXTRA_LOGGERS=lora (set by `animelora serve` and by the deployments' job
variables) only attaches Prefect's API handler to the ``lora`` logger; the logger's level is
left unset, so it inherits the root logger's WARNING and "starting run ...", "resumed from
..." and the other INFO lines of training and fetching never leave the process. Flows call
:func:`forward_library_logs` first thing.
"""
from __future__ import annotations

import logging

LIBRARY_LOGGER = "lora"


def forward_library_logs(level: int = logging.INFO) -> None:
    """Lower the ``lora`` logger to ``level`` unless someone already chose its level."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
