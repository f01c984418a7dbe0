"""The `train-lora` flow's parameters as three typed groups, one job each.

`data` says which data set to grow and how (the Danbooru query, the target size), `training`
what to train and how long a segment may run, `results` what happens to the trained LoRA
(comparison, samples, publishing). Prefect draws each group as a form with these descriptions in
the UI, and refuses a bad value naming its field (``data.target_size``) before the run starts.

A deployment's defaults are per group (``train-lora/phase2a-l2`` sets ``data.target_size`` 600),
but Prefect merges a run's parameters into the deployment's one level deep only: a run that
passes ``data`` would drop the deployment's ``target_size``. :func:`with_deployment_defaults`
puts them back, field by field, so ``--params '{"data": {"dataset": "anime"}}'`` on
phase2a-l2 still grows the data set to 600 images.
"""
from __future__ import annotations

from typing import Any, TypeVar

from prefect.client.orchestration import get_client
from prefect.runtime import deployment
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora.config import DEFAULT_MODEL, PRESETS, check_preset


class _Group(BaseModel):
    """Frozen (a default instance in the flow's signature is shared) and strict about names (a
    misspelt field is refused by name, not silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSetParams(_Group):
    """The data set to grow before training: where it lives and the Danbooru query that fills it."""

    workspace: str = Field("workspace", description="Folder that holds datasets/ and runs/ (relative "
                                                    "paths are the worker's working directory).")
    dataset: str = Field("anime", description="Name of the data set (a folder under "
                                              "<workspace>/datasets); it also names the default run.")
    tags: str = Field("1girl", description="Danbooru tag query that fills the data set, e.g. '1girl solo'.")
    target_size: int = Field(300, ge=1, description="Images the data set must hold before training; "
                                                    "below it, up to three refresh rounds fetch more.")
    booru_url: str = Field("https://danbooru.donmai.us", description="Danbooru-compatible server to fetch from.")
    ratings: str = Field("g,s", description="Ratings to keep, comma-separated (g, s, q, e).")
    min_side: int = Field(512, ge=1, description="Images whose shorter side is below this many pixels "
                                                 "are skipped.")
    trigger_word: str | None = Field(None, description="Word put first in every caption (and in the "
                                                       "model card), if any.")
    danbooru_credentials_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding 'login:api_key' for Danbooru "
                          "(else DANBOORU_LOGIN / DANBOORU_API_KEY from the environment, else anonymous).")
    requests_per_second: float = Field(1.0, gt=0, description="Politeness limit for the Danbooru server.")


class TrainingParams(_Group):
    """What to train (the preset and its overrides) and how the training is cut into segments."""

    preset: str = Field("phase2a", description=f"Training recipe: {', '.join(PRESETS)} (README: Presets).")
    model: str = Field(DEFAULT_MODEL, description="Base model: a Hugging Face id, a local folder, or "
                                                  "'tiny' (tests and demos).")
    run_name: str | None = Field(None, description="Run folder under <workspace>/runs; the same name "
                                                   "resumes that run. Default: <dataset>-<preset>.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (demos "
                                                          "and tests); default: the preset's epochs.")
    epochs: int | None = Field(None, ge=1, description="Epochs instead of the preset's.")
    overrides: dict[str, Any] | None = Field(
        None, description="Any other training setting, e.g. {\"batch_size\": 2, \"low_memory\": true}.")
    segment_steps: int | None = Field(None, ge=1, description="Steps per train-segment task; default: "
                                                              "the whole run in one segment.")
    segment_minutes: float = Field(60.0, ge=0, description="Time budget of each segment (below a Colab "
                                                           "session's limit); 0: none.")
    gpus: int = Field(1, ge=1, description="GPUs each segment trains on, data-parallel (docs/gpu.md).")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return check_preset(value)


class ResultsParams(_Group):
    """What happens to the trained LoRA: the comparison, the samples and publishing to the Hub."""

    compare_to: str | None = Field(
        "auto", description="Earlier run in the same workspace to compare, sample against and gate "
                            "publishing on; 'auto': the guide's previous rung on this data set; "
                            "'none': no comparison.")
    sample: bool = Field(True, description="Draw base-vs-LoRA sample grids at fixed seeds.")
    publish: bool = Field(False, description="Upload to the Hugging Face Hub when the gate passes.")
    publish_dry_run: bool = Field(False, description="Stage the Hub folder and model card, upload nothing.")
    repo_id: str | None = Field(None, description="Hub repository to publish to, '<user>/<name>'.")
    private: bool = Field(False, description="Create the Hub repository as private.")
    allow_test_model: bool = Field(False, description="Allow publishing a LoRA of the tiny test model.")
    hub_token_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the Hub token (else HF_TOKEN from "
                          "the environment).")
    hub_endpoint: str | None = Field(None, description="Another Hub server (tests, mirrors).")


Group = TypeVar("Group", bound=_Group)


def with_deployment_defaults(name: str, given: Group | dict[str, Any] | None, group: type[Group],
                             deployment: dict[str, Any] | None) -> Group:
    """The group ``name`` as the run meant it: the deployment's values for it (``deployment``,
    its parameters), overlaid with the fields the run set itself.

    Prefect replaces a deployment's group whole when a run passes that group; the fields the run
    did not name come back from the deployment here (pydantic remembers which were set).
    """
    value = group.model_validate(given or {})
    defaults = (deployment or {}).get(name) or {}
    if not defaults:
        return value
    return group.model_validate({**dict(defaults), **value.model_dump(exclude_unset=True)})


def deployment_parameters() -> dict[str, Any]:
    """The parameters of the deployment this flow run came from; ``{}`` for a direct call."""
    if deployment.id is None:
        return {}
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment(deployment.id).parameters or {})


def run_parameters(params: dict[str, Any]) -> tuple[DataSetParams, TrainingParams, ResultsParams]:
    """The three groups a flow run trains with, from its parameters (model instances or the JSON
    a deployment run sends) and its deployment's defaults. The run's name and its body both read
    them here, so the name always says what trains."""
    values = deployment_parameters()
    return (with_deployment_defaults("data", params.get("data"), DataSetParams, values),
            with_deployment_defaults("training", params.get("training"), TrainingParams, values),
            with_deployment_defaults("results", params.get("results"), ResultsParams, values))
