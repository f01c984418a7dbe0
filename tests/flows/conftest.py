"""Fixtures for the train-lora flow tests: a loopback Danbooru and a per-test workspace."""
from __future__ import annotations

import pytest

from lora.testing.fakebooru import FakeDanbooru, generate_posts


@pytest.fixture(scope="module")
def booru():
    """A Danbooru-compatible server with enough clean posts for a tiny run (traps included)."""
    with FakeDanbooru(generate_posts(80, seed=7)) as server:
        yield server


@pytest.fixture()
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture()
def flow_params(workspace, booru):
    """Builds the demo-sized parameters every flow test starts from."""

    def build(**extra):
        params = dict(
            workspace=str(workspace), dataset="demo", tags="1girl", target_size=12,
            booru_url=booru.url, model="tiny", max_steps=8, requests_per_second=10.0,
            sample=False,
        )
        params.update(extra)
        return params

    return build
