"""Errors raised by the Danbooru client.

Each error says what the user should change, because the usual causes (a wrong key, a blocked
User-Agent, too many tags) are configuration mistakes, not bugs. No message ever contains an
API key.
"""
from __future__ import annotations

TAG_LIMIT_HINT = (
    "Danbooru allows 2 tags for anonymous/Member accounts; set DANBOORU_LOGIN and "
    "DANBOORU_API_KEY (Gold allows 6) or use fewer tags; metatags like rating: don't count"
)


class BooruError(Exception):
    """Any failure talking to a Danbooru-compatible server."""


class BooruAuthError(BooruError):
    """401/403: the credentials, the key's scope or the User-Agent were refused."""


class BooruQueryError(BooruError, ValueError):
    """The tag query cannot be run as written (too many tags, bad metatag value, HTTP 422)."""


class DownloadError(BooruError):
    """A file could not be downloaded intact; `reason` is a short machine-readable code.

    Codes: "md5-mismatch", "truncated", "timeout", "connection-error", "http-<status>",
    "no-file-url", "io-error", "stalled" (slower than the rate floor), "deadline-exceeded" (the
    per-file deadline passed; a later fetch tries again); and the limits, which are never retried: "oversized" (more bytes
    than the post declares, or than the global cap), "unsupported-url-scheme:<scheme>",
    "file-host-not-allowed:<host>", "too-many-redirects", "bad-file-url".
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or reason)
