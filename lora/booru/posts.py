"""`Post`: the fields of a Danbooru post that the data pipeline needs, and why one is skipped.

Danbooru's JSON is not uniform: banned or restricted posts come without file_url and md5,
old posts lack some fields, and videos share the endpoint with images. `Post.from_json`
tolerates all of that; `skip_reason` decides, before any download, whether a post can become
a training image at all.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "avif")
CATEGORIES = ("general", "character", "copyright", "artist", "meta")


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _opt_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _opt_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(t) for t in value]
    raise PostFormatError("tags", f"expected a string or a list of tags, got {type(value).__name__}")


def _post_id(value: Any) -> int:
    """A post id: a positive whole number (a JSON number or a string of digits), nothing else."""
    if isinstance(value, bool):
        raise PostFormatError("id", f"expected a positive whole number, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise PostFormatError("id", f"expected a positive whole number, got {shown}")


class PostFormatError(ValueError):
    """A posts.json item that cannot be read as a post; ``field`` names the offending field.

    The client skips such an item (the rest of the page goes on) and reports it as a
    :class:`MalformedPost`, so one broken entry never aborts a fetch.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"post field {field!r}: {message}")
        self.field = field


@dataclass(frozen=True)
class MalformedPost:
    """A posts.json item that was skipped: which field was wrong, and a stable key for it.

    ``key`` is the post id when that one is readable, else a short hash of the item, so the
    same broken entry is recorded once however often a later walk meets it again.
    """

    key: str
    field: str
    message: str
    post_id: int | None = None

    @classmethod
    def from_item(cls, item: Any, error: PostFormatError) -> "MalformedPost":
        """Describe a skipped item; its id is used as the key when it is a readable id."""
        post_id: int | None = None
        if isinstance(item, dict):
            try:
                post_id = _post_id(item.get("id"))
            except PostFormatError:
                post_id = None
        if post_id is not None:
            key = str(post_id)
        else:
            raw = json.dumps(item, sort_keys=True, default=str).encode()
            key = "malformed-" + hashlib.sha1(raw).hexdigest()[:16]
        return cls(key=key, field=error.field, message=str(error), post_id=post_id)


@dataclass
class Post:
    """One Danbooru post. Tag lists are per category, as Danbooru's tag_string_<category>."""

    id: int
    md5: str | None = None
    file_url: str | None = None
    large_file_url: str | None = None
    file_ext: str = ""
    file_size: int = 0
    width: int = 0
    height: int = 0
    rating: str = ""
    score: int = 0
    tags_general: list[str] = field(default_factory=list)
    tags_character: list[str] = field(default_factory=list)
    tags_copyright: list[str] = field(default_factory=list)
    tags_artist: list[str] = field(default_factory=list)
    tags_meta: list[str] = field(default_factory=list)
    is_deleted: bool = False
    is_banned: bool = False
    parent_id: int | None = None
    source: str = ""
    preview_file_url: str | None = None
    fav_count: int = 0
    has_children: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Post":
        """A Post from Danbooru's posts.json item, or from `Post.to_json()` output."""
        if not isinstance(d, dict):
            raise PostFormatError("post", f"expected a JSON object, got {type(d).__name__}")
        if d.get("id") is None:
            raise PostFormatError("id", f"missing in an item with fields {sorted(map(str, d))[:8]}")
        post_id = _post_id(d.get("id"))
        for name in ("file_url", "md5", "file_ext"):
            if d.get(name) is not None and not isinstance(d.get(name), str):
                raise PostFormatError(name, f"expected a string, got {type(d.get(name)).__name__}")

        def pick(*names: str) -> Any:
            for n in names:
                if d.get(n) is not None:
                    return d[n]
            return None

        file_url = _opt_str(d.get("file_url"))
        ext = str(d.get("file_ext") or "").lower()
        if not ext and file_url:
            path = urlparse(file_url).path
            ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        return cls(
            id=post_id,
            md5=_opt_str(d.get("md5")),
            file_url=file_url,
            large_file_url=_opt_str(d.get("large_file_url")),
            file_ext=ext,
            file_size=_int(d.get("file_size")),
            width=_int(pick("image_width", "width")),
            height=_int(pick("image_height", "height")),
            rating=str(d.get("rating") or ""),
            score=_int(d.get("score")),
            tags_general=_tags(pick("tags_general", "tag_string_general")),
            tags_character=_tags(pick("tags_character", "tag_string_character")),
            tags_copyright=_tags(pick("tags_copyright", "tag_string_copyright")),
            tags_artist=_tags(pick("tags_artist", "tag_string_artist")),
            tags_meta=_tags(pick("tags_meta", "tag_string_meta")),
            is_deleted=bool(d.get("is_deleted") or False),
            is_banned=bool(d.get("is_banned") or False),
            parent_id=_opt_int(d.get("parent_id")),
            source=str(d.get("source") or ""),
            preview_file_url=_opt_str(d.get("preview_file_url")),
            fav_count=_int(d.get("fav_count")),
            has_children=bool(d.get("has_children") or False),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this Post's fields; `Post.from_json` reads it back unchanged."""
        return asdict(self)

    @property
    def tags(self) -> list[str]:
        """Every tag of every category, alphabetical (Danbooru's tag_string order)."""
        return sorted(set(self.tags_general + self.tags_character + self.tags_copyright
                          + self.tags_artist + self.tags_meta))

    @property
    def tag_string(self) -> str:
        return " ".join(self.tags)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def skip_reason(
    post: Post,
    *,
    max_file_size: int = 50 * 2**20,
    max_pixels: int = 150_000_000,
    allowed_exts: tuple[str, ...] | list[str] = IMAGE_EXTS,
) -> str | None:
    """Why this post cannot be a training image, decided from its metadata alone; None to keep.

    Reasons: "deleted", "banned", "no-file-url", "no-md5", "not-an-image:<ext>",
    "file-too-large", "too-many-pixels". A size of 0 means unknown and passes.
    """
    if post.is_deleted:
        return "deleted"
    if post.is_banned:
        return "banned"
    if not post.file_url:
        return "no-file-url"
    if not post.md5:
        return "no-md5"
    ext = (post.file_ext or "").lower()
    if ext not in {e.lower().lstrip(".") for e in allowed_exts}:
        return f"not-an-image:{ext or 'unknown'}"
    if max_file_size and post.file_size > max_file_size:
        return "file-too-large"
    if max_pixels and post.pixels > max_pixels:
        return "too-many-pixels"
    return None
