"""Danbooru client: query building, cursor paging, auth, rate limit, retries, `Post`,
skip reasons and verified atomic downloads. Prefect-free."""
from lora.booru.client import (
    DEFAULT_CONNECTIONS_PER_HOST,
    DEFAULT_DOWNLOAD_WORKERS,
    DEFAULT_MAX_DOWNLOAD_BYTES,
    DEFAULT_URL,
    DanbooruClient,
    FileJob,
    default_user_agent,
    normalize_host,
)
from lora.booru.credentials import Credentials
from lora.booru.errors import BooruAuthError, BooruError, BooruQueryError, DownloadError
from lora.booru.posts import IMAGE_EXTS, MalformedPost, Post, PostFormatError, skip_reason
from lora.booru.query import METATAGS, build_query, count_user_tags, is_metatag, normalize_rating

__all__ = [
    "DEFAULT_CONNECTIONS_PER_HOST", "DEFAULT_DOWNLOAD_WORKERS", "DEFAULT_MAX_DOWNLOAD_BYTES",
    "DEFAULT_URL", "DanbooruClient", "FileJob", "normalize_host",
    "MalformedPost", "PostFormatError", "default_user_agent", "Credentials", "BooruError",
    "BooruAuthError", "BooruQueryError", "DownloadError", "IMAGE_EXTS", "Post", "skip_reason",
    "METATAGS", "build_query", "count_user_tags", "is_metatag", "normalize_rating",
]
