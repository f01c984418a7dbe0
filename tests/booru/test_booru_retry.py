"""Throttling, retries and the client's own rate limit, timed on a real loopback server."""
from __future__ import annotations

import time

import pytest

from lora.booru import BooruError
from lora.testing.fakebooru import FakeDanbooru


def test_429_retry_after_is_honoured(make_booru, make_client) -> None:
    fake = make_booru(throttle_once=True)
    client = make_client(fake.url)
    t0 = time.monotonic()
    posts = client.get_posts("1girl", limit=3)
    elapsed = time.monotonic() - t0
    assert len(posts) == 3
    assert elapsed >= 0.95  # Retry-After: 1, not the 0.01 s backoff
    assert [r.status for r in fake.requests] == [429, 200]


def test_503_is_retried_with_backoff(make_booru, make_client) -> None:
    fake = make_booru(throttle_once=True, fail_once_503=True)
    client = make_client(fake.url)
    assert len(client.get_posts("", limit=4)) == 4
    assert [r.status for r in fake.requests] == [429, 503, 200]


def test_timeout_is_retried(make_booru, make_client) -> None:
    fake = make_booru(delay_once_s=1.0)
    client = make_client(fake.url, timeout=0.3)
    assert len(client.get_posts("", limit=2)) == 2
    assert len(fake.requests) == 2


def test_unreachable_server_gives_up_after_max_retries(make_client) -> None:
    fake = FakeDanbooru(posts=[]).start()
    url = fake.url
    fake.stop()  # nothing listens there any more
    client = make_client(url, max_retries=2)
    with pytest.raises(BooruError, match="giving up after 3 attempts: connection error"):
        client.get_posts("1girl")


def test_rate_limit_is_enforced(booru, make_client) -> None:
    client = make_client(booru.url, requests_per_second=5)
    t0 = time.monotonic()
    for _ in range(5):
        client.get_posts("1girl", limit=1)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.78  # 4 intervals of 0.2 s
    assert len(booru.requests) == 5
