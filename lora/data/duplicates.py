"""Which copy of a duplicate group the data set keeps, and what the others record.

Why a policy and not "first come, first kept": the same picture arrives as a lossless original,
a JPEG re-encode, a downscaled repost, with or without the user's caption. Keeping whichever
came first lets a later upload order decide quality. The rule, in order:

1. lossless over lossy (PNG/BMP/GIF/TIFF over JPEG/WebP/AVIF, judged by the source format),
2. more pixels over fewer,
3. a copy with a caption over one without,
4. then the earlier copy (the one already kept, or the lower post id in one batch).

Whatever copy is kept inherits a caption from a copy that has one when it has none itself, so
a user's ``.txt`` is never dropped for a byte-identical or near copy.

A better copy can arrive in a later refresh, after the kept one went into a written version.
Versions are immutable file lists, so the older copy is *superseded*, not removed: its row
becomes ``duplicate`` of the newcomer (``duplicate_of``) but keeps its ``file``, and the file
and caption stay on disk, so every old version still trains exactly as before; new versions
list the newcomer. Rows that pointed at the superseded copy are re-pointed at the newcomer.
"""
from __future__ import annotations

from typing import Any

from lora.data.dedup import HammingIndex

__all__ = ["LOSSLESS_EXTS", "is_lossless", "has_caption", "better_copy", "inherit_caption", "KeptCopies"]

LOSSLESS_EXTS = frozenset({"png", "bmp", "gif", "tif", "tiff"})
_TAG_FIELDS = ("tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta")

Row = dict[str, Any]


def is_lossless(row: Row) -> bool:
    """Judged by the source's format (WebP may be either; it counts as lossy)."""
    return str(row.get("file_ext") or "").lower().lstrip(".") in LOSSLESS_EXTS


def has_caption(row: Row) -> bool:
    """Whether the copy came with tags (a Danbooru post, a ``.txt`` or metadata.json entry)."""
    return any((row.get(name) or "").strip() for name in _TAG_FIELDS)


def _rank(row: Row) -> tuple[bool, int, bool]:
    return (is_lossless(row), int(row.get("width") or 0) * int(row.get("height") or 0), has_caption(row))


def better_copy(newcomer: Row, incumbent: Row) -> bool:
    """True when ``newcomer`` should be kept instead of ``incumbent`` (ties keep the incumbent)."""
    return _rank(newcomer) > _rank(incumbent)


def inherit_caption(kept: Row, other: Row) -> bool:
    """Give ``kept`` the caption and tags of ``other`` when only ``other`` has them."""
    if has_caption(kept) or not has_caption(other):
        return False
    kept["caption"] = other.get("caption")
    for name in _TAG_FIELDS:
        kept[name] = other.get(name)
    return True


def duplicate_kind(row: Row, kept: Row) -> str:
    """``md5-duplicate-of`` for byte-identical copies, ``duplicate-of`` for near ones."""
    return "md5-duplicate-of" if row.get("md5") and row.get("md5") == kept.get("md5") else "duplicate-of"


class KeptCopies:
    """The kept copy of every duplicate group seen so far, findable by md5, phash or parent.

    Every copy ever kept stays in the look-ups; ``replaced`` maps a superseded copy to the one
    that replaced it, so a match on any member resolves to the group's current kept copy.
    """

    def __init__(self, radius: int = 4, group_parents: bool = False) -> None:
        self.radius = radius
        self.group_parents = group_parents
        self._index: HammingIndex[str] = HammingIndex(radius=radius)
        self._md5: dict[str, str] = {}
        self._parents: dict[int, str] = {}
        self.replaced: dict[str, str] = {}

    def current(self, row_id: str) -> str:
        while row_id in self.replaced:
            row_id = self.replaced[row_id]
        return row_id

    def add(self, row: Row) -> None:
        if row.get("phash"):
            self._index.add(row["phash"], row["id"])
        if row.get("md5"):
            self._md5.setdefault(row["md5"], row["id"])
        for key in (row.get("parent_id"), row.get("post_id")):
            if isinstance(key, int):
                self._parents.setdefault(key, row["id"])

    def replace(self, old_id: str, new: Row) -> None:
        self.replaced[old_id] = new["id"]
        self.add(new)

    def match(self, row: Row) -> tuple[str, str] | None:
        """``(kept id, kind)`` of the group ``row`` belongs to, or None for a new picture.

        Kinds: ``md5-duplicate-of``, ``duplicate-of`` (phash within the radius) and, with
        ``group_parents``, ``same-parent-as``.
        """
        md5 = row.get("md5")
        if md5 and md5 in self._md5:
            return self.current(self._md5[md5]), "md5-duplicate-of"
        if row.get("phash"):
            hit = self._index.nearest(row["phash"])
            if hit is not None and hit[1] <= self.radius:
                return self.current(str(hit[0])), "duplicate-of"
        if self.group_parents:
            for key in (row.get("parent_id"), row.get("post_id")):
                if isinstance(key, int) and key in self._parents:
                    kept = self.current(self._parents[key])
                    if kept != row["id"]:
                        return kept, "same-parent-as"
        return None
