"""The train-lora flow's parameters as typed groups: what the UI's form shows, a bad value refused
by its field's name before anything runs, a deployment's values kept field by field."""
from __future__ import annotations

import pytest

from flows.params import DataSetParams, TrainingParams, with_deployment_defaults
from flows.train_lora import train_lora

#: The flow's defaults from before the parameters were grouped (they must not move).
DEFAULTS = {
    "data": {"workspace": "workspace", "dataset": "anime", "tags": "1girl", "target_size": 300,
             "booru_url": "https://danbooru.donmai.us", "ratings": "g,s", "min_side": 512,
             "trigger_word": None, "danbooru_credentials_block": None, "requests_per_second": 1.0},
    "training": {"preset": "phase2a", "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 "run_name": None, "max_steps": None, "epochs": None, "overrides": None,
                 "segment_steps": None, "segment_minutes": 60.0, "gpus": 1},
    "results": {"compare_to": "auto", "sample": True, "publish": False, "publish_dry_run": False,
                "repo_id": None, "private": False, "allow_test_model": False, "hub_token_block": None,
                "hub_endpoint": None},
}


def test_the_ui_form_shows_three_groups_with_every_field_explained():
    schema = train_lora.parameters.model_dump()
    assert list(schema["properties"]) == ["data", "training", "results"]
    for name, model in (("data", "DataSetParams"), ("training", "TrainingParams"), ("results", "ResultsParams")):
        prop = schema["properties"][name]
        assert prop["$ref"] == f"#/definitions/{model}" and prop["description"], prop
        assert prop["default"] == DEFAULTS[name]
        definition = schema["definitions"][model]
        assert definition["description"] and definition["additionalProperties"] is False
        undescribed = [f for f, spec in definition["properties"].items() if not spec.get("description")]
        assert not undescribed, (model, undescribed)
    assert schema["definitions"]["TrainingParams"]["properties"]["gpus"]["minimum"] == 1


@pytest.mark.parametrize("groups, field", [
    ({"training": {"gpus": 0}}, "training.gpus"),
    ({"training": {"preset": "phase9"}}, "training.preset"),
    ({"data": {"target_sise": 5}}, "data.target_sise"),
    ({"data": {"requests_per_second": 0}}, "data.requests_per_second"),
    ({"results": {"sample": "maybe"}}, "results.sample"),
])
def test_a_bad_value_is_refused_by_its_field_before_anything_runs(prefect_api, flow_params, workspace, booru,
                                                                  groups, field):
    booru.clear_requests()
    state = train_lora(**flow_params(**groups), return_state=True)
    assert state.is_failed(), state
    assert field in state.message, state.message
    assert list(workspace.iterdir()) == [] and booru.requests == []


def test_a_deployments_values_fill_the_fields_a_run_leaves_out():
    """Prefect replaces a deployment's group whole when a run passes that group."""
    deployment = {"data": {"target_size": 600}, "training": {"preset": "phase2a-l2"}}
    data = with_deployment_defaults("data", {"dataset": "anime"}, DataSetParams, deployment)
    assert (data.dataset, data.target_size) == ("anime", 600)
    assert with_deployment_defaults("data", {"target_size": 12}, DataSetParams, deployment).target_size == 12
    training = with_deployment_defaults("training", TrainingParams(max_steps=4), TrainingParams, deployment)
    assert (training.preset, training.max_steps) == ("phase2a-l2", 4)
    assert with_deployment_defaults("training", None, TrainingParams, {}).preset == "phase2a"
