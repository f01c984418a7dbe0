"""Kohya-style captions from Danbooru tags.

Why: SD LoRA trainers (kohya sd-scripts, diffusers examples) read one ``.txt`` per image with
comma-separated tags, and they learn best when the important tags come first and in a stable order
(kohya's ``keep_tokens`` keeps the head of the caption fixed while shuffling the rest). The order
written here is: trigger word, count tags (1girl, solo ...), character, copyright, artist (only when
training a style), then the remaining general tags. Meta tags (highres, commentary_request ...) say
nothing about the picture and are dropped.
"""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lora.fsutil import atomic_write_bytes

__all__ = [
    "CaptionOptions",
    "TagSet",
    "normalize_tag",
    "is_count_tag",
    "is_meta_tag",
    "build_caption",
    "caption_from_text",
    "split_caption",
    "CaptionFileError",
    "CaptionText",
    "load_caption",
    "read_caption",
    "write_caption",
]

# Tags Danbooru files under the "meta" category (plus common patterns). Used only when the tags
# come as one flat string; posts from the API carry their own categories.
# jpeg_artifacts is meta on Danbooru and describes the file, not the picture: dropped too.
META_TAGS: frozenset[str] = frozenset(
    {
        "highres", "absurdres", "incredibly_absurdres", "lowres", "huge_filesize",
        "commentary", "translated", "partially_translated", "check_translation",
        "hard-translated", "non-english_commentary", "mixed-language_commentary",
        "bad_id", "bad_link", "bad_source", "md5_mismatch", "duplicate", "tagme", "revision",
        "resized", "upscaled", "downscaled", "jpeg_artifacts", "image_sample", "pixiv_sample",
        "twitter_sample", "weibo_sample", "third-party_edit", "third-party_source",
        "variant_set", "paid_reward_available", "official_art", "scan", "non-web_source",
        "animated", "animated_gif", "animated_png", "video", "sound", "webm", "ugoira",
        "ai-generated", "ai-assisted", "wide_image", "tall_image", "alternate_version",
        "has_bad_revision", "has_downscaled_revision", "has_lossy_revision", "has_cropped_revision",
        "making-of_available", "source_larger", "source_smaller", "corrupted_file",
        "corrupted_image", "photoshop_(medium)", "spoilers", "16:9", "4:3",
    }
)
_META_PATTERNS = (
    re.compile(r"^.*_request$"),  # commentary_request, translation_request, artist_request ...
    re.compile(r"^.*_commentary$"),  # english_commentary, chinese_commentary ...
    re.compile(r"^commentary_.*$"),
    re.compile(r"^bad_[a-z]+_id$"),  # bad_pixiv_id, bad_twitter_id ...
    re.compile(r"^\d+:\d+_aspect_ratio$"),
)

_COUNT_RE = re.compile(r"^(\d+)\+?(girl|boy|other)s?$")
COUNT_TAGS: frozenset[str] = frozenset(
    {"solo", "multiple_girls", "multiple_boys", "multiple_others", "no_humans"}
)


def _key(tag: str) -> str:
    """Comparison key: underscores and spaces are the same, case and outer space ignored."""
    return normalize_tag(tag).casefold()


def _raw(tag: str) -> str:
    """Danbooru spelling (underscores) for category checks."""
    return tag.strip().replace(" ", "_").casefold()


def is_meta_tag(tag: str) -> bool:
    """True for Danbooru meta tags (file/upload facts, not picture content)."""
    t = _raw(tag)
    return t in META_TAGS or any(p.match(t) for p in _META_PATTERNS)


def is_count_tag(tag: str) -> bool:
    """True for the head-of-caption count tags: 1girl, 2boys, 6+girls, solo, no_humans ..."""
    t = _raw(tag)
    return t in COUNT_TAGS or bool(_COUNT_RE.match(t))


def normalize_tag(tag: str) -> str:
    """Danbooru spelling to caption spelling: ``_`` becomes a space.

    Short emoticons keep their underscores (``^_^``, ``o_o``, ``>_<``): tags of at most 3
    characters, and tags with no letter or digit at all (``^_^;``). Parentheses are written
    plainly (``hatsune_miku_(cosplay)`` -> ``hatsune miku (cosplay)``); nothing is escaped.
    """
    t = tag.strip()
    if len(t) <= 3 or not any(ch.isalnum() for ch in t):
        return t
    return " ".join(t.replace("_", " ").split())


def _split(s: str | Iterable[str] | None) -> list[str]:
    if s is None:
        return []
    if isinstance(s, str):
        return [t for t in s.split() if t]
    return [str(t).strip() for t in s if str(t).strip()]


@dataclass
class TagSet:
    """A post's tags by Danbooru category (Danbooru spelling, underscores)."""

    general: list[str] = field(default_factory=list)
    character: list[str] = field(default_factory=list)
    copyright: list[str] = field(default_factory=list)
    artist: list[str] = field(default_factory=list)
    meta: list[str] = field(default_factory=list)

    @classmethod
    def from_post(cls, post: Any) -> "TagSet":
        """From anything with ``tags_general`` / ``tags_character`` / ``tags_copyright`` /
        ``tags_artist`` / ``tags_meta`` attributes (each a space-separated string or a list).

        Also accepts a dict with Danbooru's ``tag_string_general`` ... keys. Meta-looking tags
        that sit in ``general`` are moved to ``meta`` as well.
        """

        def get(name: str) -> Any:
            if isinstance(post, dict):
                return post.get(f"tags_{name}", post.get(f"tag_string_{name}"))
            return getattr(post, f"tags_{name}", None)

        general = _split(get("general"))
        meta = _split(get("meta"))
        return cls(
            general=[t for t in general if not is_meta_tag(t)],
            character=_split(get("character")),
            copyright=_split(get("copyright")),
            artist=_split(get("artist")),
            meta=meta + [t for t in general if is_meta_tag(t)],
        )

    @classmethod
    def from_tag_string(cls, s: str | Iterable[str]) -> "TagSet":
        """From one flat list (Danbooru's ``tag_string``, or a ``metadata.json`` ``tags`` field).

        Categories are unknown, so everything is general except meta tags, detected by name.
        Accepts space-separated Danbooru tags or a comma-separated caption.
        """
        if isinstance(s, str) and "," in s:
            items = [t.strip() for t in s.split(",") if t.strip()]
        else:
            items = _split(s)
        return cls(
            general=[t for t in items if not is_meta_tag(t)],
            meta=[t for t in items if is_meta_tag(t)],
        )


@dataclass
class CaptionOptions:
    """How to turn tags into a caption.

    - ``trigger_word``: written first, verbatim (not counted by ``max_tags``).
    - ``include_artist``: keep artist tags (for style training).
    - ``blacklist``: tags to remove, matched after normalisation (``long_hair`` == ``long hair``).
    - ``max_tags``: keep at most this many tags after the trigger word (head first, so count /
      character / copyright tags survive and the tail of the general tags is cut).
    - ``shuffle``: shuffle the general tags (the head stays fixed), with ``seed`` for
      reproducibility.
    """

    trigger_word: str | None = None
    include_artist: bool = False
    blacklist: Sequence[str] = ()
    max_tags: int | None = None
    shuffle: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tags is not None and self.max_tags < 0:
            raise ValueError(f"max_tags must be >= 0, got {self.max_tags}")
        if isinstance(self.blacklist, str):
            # A single string would be iterated per character; accept "a, b" or "a b" spellings.
            sep = "," if "," in self.blacklist else None
            self.blacklist = tuple(t.strip() for t in self.blacklist.split(sep) if t.strip())
        if self.trigger_word is not None:
            tw = self.trigger_word.strip()
            if "\n" in tw or "," in tw:
                raise ValueError(f"trigger_word must be one tag without commas or newlines: {tw!r}")
            self.trigger_word = tw or None


def build_caption(tags: TagSet, options: CaptionOptions | None = None) -> str:
    """The caption line: ``trigger, counts, characters, copyrights, [artists], general``.

    Meta tags are dropped, blacklisted tags removed, repeats removed (first kept), and the result
    joined with ``", "``.
    """
    opts = options or CaptionOptions()
    counts = [t for t in tags.general if is_count_tag(t)]
    general = [t for t in tags.general if not is_count_tag(t) and not is_meta_tag(t)]
    if opts.shuffle:
        random.Random(opts.seed).shuffle(general)
    ordered = counts + list(tags.character) + list(tags.copyright)
    if opts.include_artist:
        ordered += list(tags.artist)
    ordered += general

    return _assemble([normalize_tag(t) for t in ordered], opts)


def _assemble(tags: Iterable[str], opts: CaptionOptions) -> str:
    """``tags`` (in caption spelling and order) as a caption line under ``opts``: the trigger
    word first, blacklisted tags and repeats removed (first kept), at most ``max_tags``.

    Both captions built from Danbooru tags and captions the user wrote go through here, so
    ``--blacklist`` and ``--max-tags`` mean the same for either."""
    blacklist = {_key(b) for b in opts.blacklist}
    seen: set[str] = set()
    trigger = opts.trigger_word
    if trigger:
        seen.add(_key(trigger))
    out: list[str] = []
    for tag in tags:
        key = _key(tag)
        if not tag or key in seen or key in blacklist:
            continue
        seen.add(key)
        out.append(tag)
    if opts.max_tags is not None:
        out = out[: opts.max_tags]
    if trigger:
        out.insert(0, trigger)
    return ", ".join(out)


def split_caption(text: str) -> list[str]:
    """The tags of a kohya caption: comma-separated, inner spaces collapsed, empty ones dropped
    (a caption of commas only has no tags)."""
    return [tag for tag in (" ".join(t.split()) for t in text.split(",")) if tag]


def caption_from_text(text: str, options: CaptionOptions | None = None) -> str:
    """A caption the user wrote (a ``.txt`` beside an imported image) under ``options``.

    The user's order and spelling are kept (no reordering, no meta-tag filter: the user chose
    them); the trigger word, blacklist, repeats and ``max_tags`` apply as for Danbooru tags.
    A caption that already starts with the trigger word does not get it twice."""
    return _assemble(split_caption(text), options or CaptionOptions())


class CaptionFileError(ValueError):
    """A caption file that cannot be read as text; ``reason`` is short (for the summary)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class CaptionText:
    """A caption file's content as one line, and what was read leniently (``notes``)."""

    text: str
    notes: tuple[str, ...] = ()


def _is_text(text: str) -> bool:
    """No control characters besides line breaks and tabs (NUL, C1 controls ...): a binary file,
    or bytes of another encoding that Latin-1 would turn into garbage."""
    return not any(unicodedata.category(ch) == "Cc" and ch not in "\t\r\n" for ch in text)


def load_caption(path: Path | str) -> CaptionText:
    """A caption file as one caption line, read leniently where the meaning is clear.

    - UTF-8, with or without a byte-order mark (Windows editors write one; it is not a tag).
    - Not UTF-8 but printable as Latin-1 (an old Windows editor's file): read as Latin-1, with
      a note. Bytes that are not printable either way (another encoding, a binary file) raise
      :class:`CaptionFileError`: the caption is not guessed.
    - Several lines: joined with ``", "`` as one list of tags, with a note (kohya would read
      only the first line and silently lose the rest).
    """
    path = Path(path)
    raw = path.read_bytes()
    notes: list[str] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        if not _is_text(text):
            raise CaptionFileError(path, "caption-not-text: neither UTF-8 nor Latin-1 text") from None
        notes.append("read as Latin-1 (not UTF-8)")
    if not _is_text(text):
        raise CaptionFileError(path, "caption-not-text: holds control characters (a binary file?)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        notes.append(f"{len(lines)} lines joined with ', '")
    return CaptionText(", ".join(lines), tuple(notes))


def read_caption(path: Path | str) -> str:
    """A caption file's text as one line (see :func:`load_caption`)."""
    return load_caption(path).text


def write_caption(path: Path | str, text: str) -> None:
    """Write a caption atomically (temporary file + ``os.replace``), UTF-8, one line."""
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise ValueError(f"caption for {path} must be one line")
    atomic_write_bytes(Path(path), (text + "\n").encode("utf-8"))
