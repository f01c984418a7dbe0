"""Danbooru login + API key, kept out of reprs, logs and URLs."""
from __future__ import annotations

import os
from dataclasses import dataclass

from lora.booru.errors import BooruAuthError

LOGIN_ENV = "DANBOORU_LOGIN"
API_KEY_ENV = "DANBOORU_API_KEY"


@dataclass(frozen=True)
class Credentials:
    """A Danbooru account name and API key, sent only as HTTP Basic auth."""

    login: str
    api_key: str

    def __post_init__(self) -> None:
        if not self.login or not self.login.strip():
            raise BooruAuthError(f"Danbooru login is empty: set {LOGIN_ENV}")
        if not self.api_key or not self.api_key.strip():
            raise BooruAuthError(f"Danbooru API key is empty: set {API_KEY_ENV}")

    def __repr__(self) -> str:  # the key must never show up in logs or tracebacks
        return f"Credentials(login={self.login!r}, api_key='***')"

    __str__ = __repr__

    @classmethod
    def from_env(cls, environ: "os._Environ[str] | dict[str, str] | None" = None) -> "Credentials | None":
        """Credentials from DANBOORU_LOGIN / DANBOORU_API_KEY, or None when neither is set.

        Setting only one of the two is almost certainly a mistake, so it is an error rather
        than a silent fall-back to anonymous access.
        """
        env = os.environ if environ is None else environ
        login = (env.get(LOGIN_ENV) or "").strip()
        key = (env.get(API_KEY_ENV) or "").strip()
        if not login and not key:
            return None
        if not login:
            raise BooruAuthError(f"{API_KEY_ENV} is set but {LOGIN_ENV} is empty: set both or neither")
        if not key:
            raise BooruAuthError(f"{LOGIN_ENV} is set but {API_KEY_ENV} is empty: set both or neither")
        return cls(login=login, api_key=key)
