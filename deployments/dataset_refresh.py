"""`dataset-refresh/nightly`: refresh the default data set every night at 03:00 (UTC unless
``ANIMELORA_TIMEZONE`` names another zone where the deployment is declared).

The nightly run only asks Danbooru for posts newer than each query's cursor (plus older ones up
to the per-run limit), so it is cheap when nothing new was uploaded. Override the parameters in
the UI or with `prefect deployment run dataset-refresh/nightly -p tags=... -p dataset=...`.
"""
from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from deployments.common import schedule_timezone
from flows.dataset_refresh import dataset_refresh

NIGHTLY_CRON = "0 3 * * *"

NIGHTLY_PARAMETERS: dict = {
    "workspace": "workspace",
    "dataset": "anime",
    "tags": "1girl",
    "limit": 100,
    "ratings": "g,s",
    "min_side": 512,
    "requests_per_second": 1.0,
}


def nightly_deployment() -> RunnerDeployment:
    return dataset_refresh.to_deployment(
        name="nightly",
        schedules=[Cron(NIGHTLY_CRON, timezone=schedule_timezone())],
        parameters=dict(NIGHTLY_PARAMETERS),
        tags=["animelora", "data"],
        description="Nightly incremental refresh: new posts since each query's cursor, "
        "deduplicated, captioned and prepared into a new data-set version.",
    )
