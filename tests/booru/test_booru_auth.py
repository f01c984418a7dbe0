"""Credentials, User-Agent and the tag limit, as a user meets them."""
from __future__ import annotations

import logging

import pytest
import requests

from lora.booru import BooruAuthError, BooruQueryError, Credentials, DanbooruClient

KEY = "s3cretKEY-do-not-leak-9f8e7d"


def test_credentials_go_as_basic_auth_and_never_leak(make_booru, make_client, caplog, tmp_path) -> None:
    fake = make_booru(credentials={"alice": KEY})
    creds = Credentials("alice", KEY)
    client = make_client(fake.url, credentials=creds)
    caplog.set_level(logging.DEBUG)  # includes urllib3's connection logging
    posts = client.get_posts("1girl solo smile", limit=5)  # 3 tags: allowed for an account
    plain = next(p for p in posts if fake.post(p.id).trap is None)
    client.download(plain, tmp_path / "a.img")

    api = [r for r in fake.requests if r.path == "/posts.json"]
    assert api and all(r.has_auth and r.auth_login == "alice" and r.status == 200 for r in api)
    files = [r for r in fake.requests if r.path.startswith("/data/")]
    assert files and not any(r.has_auth for r in files)  # the key is not sent to the file host
    assert not any(KEY in r.raw_path for r in fake.requests)
    assert KEY not in caplog.text
    assert KEY not in repr(creds) and KEY not in str(creds) and KEY not in repr(client)
    assert "alice" in client.user_agent and KEY not in client.user_agent


def test_wrong_key_says_what_to_fix(make_booru, make_client) -> None:
    fake = make_booru(credentials={"alice": KEY})
    client = make_client(fake.url, credentials=Credentials("alice", "wrong-key-123"))
    with pytest.raises(BooruAuthError) as info:
        client.get_posts("1girl")
    msg = str(info.value)
    assert "401" in msg and "DANBOORU_LOGIN" in msg and "DANBOORU_API_KEY" in msg
    assert "wrong-key-123" not in msg
    assert len(fake.requests) == 1  # auth errors are not retried


def test_from_env(monkeypatch) -> None:
    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    assert Credentials.from_env() is None
    monkeypatch.setenv("DANBOORU_LOGIN", "bob")
    with pytest.raises(BooruAuthError, match="DANBOORU_API_KEY"):
        Credentials.from_env()
    monkeypatch.setenv("DANBOORU_API_KEY", KEY)
    creds = Credentials.from_env()
    assert creds == Credentials("bob", KEY) and KEY not in repr(creds)


def test_default_library_and_browser_agents_are_refused_but_ours_passes(booru, make_client) -> None:
    raw = requests.get(f"{booru.url}/posts.json", params={"tags": "1girl"}, timeout=5)
    assert raw.status_code == 403  # python-requests/x.y
    browser = make_client(booru.url, user_agent="Mozilla/5.0 (Windows NT 10.0) Chrome/120")
    with pytest.raises(BooruAuthError, match="User-Agent"):
        browser.get_posts("1girl")
    ours = make_client(booru.url)
    assert ours.get_posts("1girl", limit=3)
    assert ours.user_agent.startswith("animelora/")
    assert booru.requests[-1].user_agent == ours.user_agent


def test_third_tag_refused_before_any_request(booru, make_client) -> None:
    client = make_client(booru.url)
    with pytest.raises(BooruQueryError, match="Danbooru allows 2 tags"):
        client.get_posts("1girl solo smile")
    assert booru.requests == []
    # metatags are free
    client.get_posts("1girl solo rating:g,s -status:deleted width:>=512", limit=2)


def test_server_side_422_is_mapped(make_booru, make_client) -> None:
    fake = make_booru(anonymous_tag_limit=1)  # a stricter server than the client assumes
    with pytest.raises(BooruQueryError) as info:
        make_client(fake.url).get_posts("1girl solo")
    msg = str(info.value)
    assert "422" in msg and "more than 1 tags" in msg and "DANBOORU_API_KEY" in msg
    assert len(fake.requests) == 1


def test_requests_per_second_hard_cap() -> None:
    with pytest.raises(ValueError, match="requests_per_second"):
        DanbooruClient("http://127.0.0.1:1", requests_per_second=11)
    with pytest.raises(ValueError, match="requests_per_second"):
        DanbooruClient("http://127.0.0.1:1", requests_per_second=0)
