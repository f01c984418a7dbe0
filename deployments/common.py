"""Settings every deployment shares, whichever way it runs (`animelora serve` or a worker).

The deployments are declared once, in Python (deployments/train_lora.py,
deployments/dataset_refresh.py); prefect.yaml is generated from those declarations
(`python -m deployments.prefect_yaml --write`), so both ways run the same thing.
"""
from __future__ import annotations

import os
from zoneinfo import available_timezones

#: The work pool prefect.yaml's deployments go to (`prefect work-pool create gpu-pool --type process`).
WORK_POOL = "gpu-pool"

#: Environment every flow run gets: the library's `lora` loggers go to the Prefect UI too.
FLOW_RUN_ENV: dict[str, str] = {"PREFECT_LOGGING_EXTRA_LOGGERS": "lora"}

#: Time zone of the schedules (the nightly cron); an IANA name such as ``Europe/Berlin``.
TIMEZONE_ENV = "ANIMELORA_TIMEZONE"
DEFAULT_TIMEZONE = "UTC"


def schedule_timezone() -> str:
    """``ANIMELORA_TIMEZONE`` or UTC; an unknown name is a clear error, not a silent UTC.

    UTC by default so a deployment means the same hour on every machine that declares it
    (a laptop in one zone and a GPU host in another would otherwise disagree).
    """
    name = os.environ.get(TIMEZONE_ENV, "").strip() or DEFAULT_TIMEZONE
    if name != DEFAULT_TIMEZONE and name not in available_timezones():
        raise ValueError(
            f"{TIMEZONE_ENV}: unknown time zone {name!r} (expected an IANA name such as "
            "'UTC' or 'Europe/Berlin')"
        )
    return name
