"""One refresh orchestration: `Refresh` runs the named steps in order through whatever
`RefreshSteps` it is given (the CLI's in-process steps, the flow's Prefect tasks)."""
from __future__ import annotations

from lora.data.collect import FetchFilters, make_client
from lora.data.manifest import DatasetPaths, load_manifest
from lora.data.queries import QuerySpec
from lora.data.refresh import LocalSteps, Refresh, RefreshPlan
from lora.testing.fakebooru import generate_posts


class RecordingSteps:
    """The in-process steps, with a log of which step ran when (another way to run them)."""

    def __init__(self, inner: LocalSteps) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name):
        step = getattr(self.inner, name)

        def run(*args, **kwargs):
            self.calls.append(name)
            return step(*args, **kwargs)

        return run


def test_refresh_runs_its_steps_in_rounds_until_the_target(booru_factory, workspace):
    server = booru_factory(generate_posts(20, seed=11, traps=False))
    paths = DatasetPaths.of(workspace, "steps").ensure()
    plan = RefreshPlan(queries=(QuerySpec("default", "status:any"),), limit=None, target_size=12,
                       filters=FetchFilters(ratings=("g", "s", "q", "e")))
    with make_client(server.url, None, 10, backoff_base=0.01) as client:
        steps = RecordingSteps(LocalSteps(paths, plan, client))
        rounds = []
        summary = Refresh(paths, plan, steps, on_round=lambda n, result: rounds.append((n, result.total_kept))).run()

    assert summary.total_kept == 12 and summary.version == "v0001"
    assert steps.calls[0] == "recover" and steps.calls[-1] == "finalize"
    body = steps.calls[1:-1]
    assert body == ["collect", "download", "commit"] * (len(body) // 3) and rounds[-1] == (len(rounds), 12)
    assert (load_manifest(paths).status == "kept").sum() == 12
