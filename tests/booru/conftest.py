"""Fixtures for the Danbooru client tests: a real loopback FakeDanbooru and fast clients."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from lora.booru import DanbooruClient
from lora.testing.fakebooru import FakeDanbooru, FakePost, generate_posts

N_POSTS = 40


@pytest.fixture(scope="session")
def fixture_posts() -> list[FakePost]:
    """One deterministic post set for the session; bytes render once and stay cached."""
    return generate_posts(N_POSTS, seed=1)


@pytest.fixture
def make_booru(fixture_posts: list[FakePost]) -> Iterator[Callable[..., FakeDanbooru]]:
    """Start FakeDanbooru servers with the session posts (copied list) and stop them after."""
    started: list[FakeDanbooru] = []

    def make(**kwargs) -> FakeDanbooru:
        kwargs.setdefault("posts", list(fixture_posts))
        fake = FakeDanbooru(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def booru(make_booru: Callable[..., FakeDanbooru]) -> FakeDanbooru:
    return make_booru()


@pytest.fixture
def make_client() -> Iterator[Callable[..., DanbooruClient]]:
    """Clients tuned for tests: the 10/s cap and tiny backoff, so retries stay fast."""
    clients: list[DanbooruClient] = []

    def make(url: str, **kwargs) -> DanbooruClient:
        kwargs.setdefault("requests_per_second", 10)
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("timeout", 5)
        client = DanbooruClient(url, **kwargs)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
