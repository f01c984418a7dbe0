"""A Danbooru-compatible HTTP server on loopback, for tests and `make demo`.

It serves `/posts.json` (tag search with metatags, offset pages with a page cap, `b<id>` /
`a<id>` cursor pages, the 2-tag limit, Basic auth, a User-Agent check, a one-off 429 and 503)
and `/data/<id>.<ext>` (generated image bytes). `generate_posts` builds deterministic
fixtures including traps (deleted, banned, file-less, video and oversized posts, duplicates ...);
each trap post carries `trap` so tests can
assert what should happen to it.

Run it by hand: `python -m lora.testing.fakebooru --port 8765 --posts 80 --seed 0`.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
import threading
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image, ImageDraw

# -- fixtures -----------------------------------------------------------------------------

COUNT_TAGS = ["1girl", "1boy", "2girls", "multiple_girls", "no_humans"]
GENERAL_TAGS = [
    "long_hair", "short_hair", "smile", "^_^", ":d", ":o", "blush", "open_mouth",
    "looking_at_viewer", "school_uniform", "serafuku", "skirt", "pleated_skirt", "blue_eyes",
    "red_eyes", "twintails", "ponytail", "hat", "dress", "thighhighs", "outdoors", "sky",
    "cloud", "tree", "flower", "cherry_blossoms", "simple_background", "white_background",
    "upper_body", "full_body", "holding", "gloves", "jacket", "hair_ribbon", "bow", "sketch",
    "landscape", "scenery", "night", "star_(sky)", "sitting", "standing", "closed_eyes",
]
CHARACTERS = [
    ("hatsune_miku", "vocaloid"), ("kagamine_rin", "vocaloid"), ("hakurei_reimu", "touhou"),
    ("kirisame_marisa", "touhou"), ("saber_(fate)", "fate/stay_night"),
    ("souryuu_asuka_langley", "neon_genesis_evangelion"), ("ayanami_rei", "neon_genesis_evangelion"),
    ("frieren", "sousou_no_frieren"),
]
ORIGINALS = ["original"]
ARTISTS = ["sakura_haru", "tanaka_ink", "pastel_fox", "moonlit_pen", "kuro_neko_art", "aoi_brush"]
META_TAGS = ["highres", "absurdres", "commentary_request", "translated", "bad_id", "bad_pixiv_id"]
SIZES = [(512, 512), (512, 768), (768, 512), (640, 832), (832, 640), (576, 704), (704, 576), (512, 640)]
IMAGE_FORMATS = ["png", "jpg", "webp"]

# Trap name → what it is. Order is the order they appear in the id sequence.
TRAPS: dict[str, str] = {
    "deleted": "is_deleted true, file still served",
    "banned": "is_banned true, no file_url and no md5",
    "no-file-url": "restricted post: no file_url and no md5, not banned",
    "video-mp4": "file_ext mp4",
    "dup-exact": "byte-identical copy of an earlier post (same md5), different id",
    "rgba": "RGBA PNG with transparent areas",
    "video-webm": "file_ext webm",
    "near-reencode": "same picture as an earlier post re-encoded as JPEG quality 60",
    "palette": "palette (mode P) PNG",
    "ugoira-zip": "file_ext zip (ugoira)",
    "cmyk": "CMYK JPEG",
    "near-resize": "an earlier post scaled to 90%, same format",
    "animated-gif": "animated GIF, 3 frames",
    "corrupt": "random bytes with a .png extension (md5 matches the bytes)",
    "truncated": "PNG cut at 60% (md5 matches the cut bytes)",
    "small": "short side below 512",
    "md5-mismatch": "served bytes never match the listed md5",
}
NO_FILE_TRAPS = {"banned", "no-file-url"}
DUPLICATE_TRAPS = {"dup-exact", "near-reencode", "near-resize"}
_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)


def render_picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A structured RGB picture (gradient + large shapes), distinct per seed.

    Large low-frequency shapes make phash stable under re-encoding and resizing and very
    different between seeds, like real illustrations and unlike noise.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    c0, c1, c2 = rng.integers(0, 256, size=(3, 3)).astype(np.float32)
    arr = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 9))):
        bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
        x0, y0 = int(rng.integers(-bw // 4, w - bw // 2)), int(rng.integers(-bh // 4, h - bh // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = rng.random()
        if kind < 0.45:
            draw.ellipse((x0, y0, x0 + bw, y0 + bh), fill=colour)
        elif kind < 0.85:
            draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=0)
    elif fmt == "gif":
        img.save(buf, "GIF")
    else:
        raise ValueError(f"fmt: unsupported image format {fmt!r}")
    return buf.getvalue()


@dataclass
class Recipe:
    """How a FakePost's bytes are made; rendering is lazy because it is the slow part."""

    kind: str  # "picture" | "copy" | "raw"
    seed: int = 0
    size: tuple[int, int] = (512, 512)
    fmt: str = "png"
    quality: int = 92
    scale: float = 1.0
    mode: str = "RGB"  # RGB, RGBA, P, CMYK, GIF-ANIM
    truncate: float | None = None
    raw: str = ""  # corrupt, mp4, webm, zip
    source: "FakePost | None" = None


@dataclass
class FakePost:
    """One fixture post. `trap` names the trap it carries (None for an ordinary post)."""

    id: int
    width: int
    height: int
    file_ext: str
    rating: str
    score: int
    fav_count: int
    tags_general: list[str]
    tags_character: list[str]
    tags_copyright: list[str]
    tags_artist: list[str]
    tags_meta: list[str]
    recipe: Recipe = field(repr=False)
    is_deleted: bool = False
    is_banned: bool = False
    has_file: bool = True
    parent_id: int | None = None
    source: str = ""
    trap: str | None = None
    duplicate_of: int | None = None
    _data: bytes | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def data(self) -> bytes:
        """The bytes served at file_url (rendered on first use, then cached)."""
        with self._lock:
            if self._data is None:
                self._data = _render(self.recipe)
            return self._data

    @property
    def real_md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    @property
    def md5(self) -> str | None:
        """The md5 the API lists (None when hidden); wrong on purpose for the md5-mismatch trap."""
        if not self.has_file:
            return None
        if self.trap == "md5-mismatch":
            return hashlib.md5(b"not-these-bytes" + self.data).hexdigest()
        return self.real_md5

    @property
    def file_size(self) -> int:
        return len(self.data) if self.has_file else 123_456

    @property
    def tags(self) -> list[str]:
        return sorted(set(self.tags_general + self.tags_character + self.tags_copyright
                          + self.tags_artist + self.tags_meta))

    @property
    def filename(self) -> str:
        return f"{self.id}.{self.file_ext}"

    def to_json(self, base_url: str) -> dict[str, Any]:
        """The post as Danbooru's posts.json lists it."""
        d: dict[str, Any] = {
            "id": self.id,
            "created_at": (_EPOCH + timedelta(hours=self.id)).isoformat(),
            "uploader_id": 100 + self.id % 17,
            "score": self.score,
            "up_score": max(self.score, 0),
            "down_score": min(self.score, 0),
            "fav_count": self.fav_count,
            "source": self.source,
            "rating": self.rating,
            "image_width": self.width,
            "image_height": self.height,
            "file_ext": self.file_ext,
            "file_size": self.file_size,
            "tag_string": " ".join(self.tags),
            "tag_string_general": " ".join(self.tags_general),
            "tag_string_character": " ".join(self.tags_character),
            "tag_string_copyright": " ".join(self.tags_copyright),
            "tag_string_artist": " ".join(self.tags_artist),
            "tag_string_meta": " ".join(self.tags_meta),
            "tag_count": len(self.tags),
            "tag_count_general": len(self.tags_general),
            "tag_count_character": len(self.tags_character),
            "tag_count_copyright": len(self.tags_copyright),
            "tag_count_artist": len(self.tags_artist),
            "tag_count_meta": len(self.tags_meta),
            "parent_id": self.parent_id,
            "has_children": False,
            "is_pending": False,
            "is_flagged": False,
            "is_deleted": self.is_deleted,
            "is_banned": self.is_banned,
        }
        if self.has_file:
            url = f"{base_url}/data/{self.filename}"
            d.update(md5=self.md5, file_url=url, large_file_url=url, preview_file_url=url)
        return d


def _render(r: Recipe) -> bytes:
    if r.kind == "copy":
        assert r.source is not None
        return r.source.data
    if r.kind == "raw":
        rng = random.Random(r.seed)
        noise = bytes(rng.getrandbits(8) for _ in range(4096))
        if r.raw == "corrupt":
            return b"\x00garbage" + noise
        if r.raw == "mp4":
            return b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + noise
        if r.raw == "webm":
            return b"\x1aE\xdf\xa3\x9fB\x86\x81\x01" + noise
        if r.raw == "zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                for i in range(2):
                    info = zipfile.ZipInfo(f"{i:06d}.jpg", date_time=(2024, 1, 1, 0, 0, 0))
                    zf.writestr(info, _encode(render_picture(r.seed + i, (128, 128)), "jpg"))
            return buf.getvalue()
        raise ValueError(f"unknown raw kind {r.raw!r}")
    if r.mode == "GIF-ANIM":
        frames = [render_picture(r.seed + i, r.size).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return buf.getvalue()
    img = render_picture(r.seed, r.size)
    if r.scale != 1.0:
        img = img.resize((round(r.size[0] * r.scale), round(r.size[1] * r.scale)), Image.Resampling.LANCZOS)
    if r.mode == "RGBA":
        alpha = Image.new("L", img.size, 0)
        ImageDraw.Draw(alpha).ellipse((img.width // 8, img.height // 8, img.width * 7 // 8, img.height * 7 // 8), fill=255)
        img.putalpha(alpha)
    elif r.mode == "P":
        img = img.quantize(64)
    elif r.mode == "CMYK":
        img = img.convert("CMYK")
    data = _encode(img, r.fmt, r.quality)
    if r.truncate is not None:
        data = data[: int(len(data) * r.truncate)]
    return data


def _random_tags(rng: random.Random) -> dict[str, list[str]]:
    count = rng.choices(COUNT_TAGS, weights=[55, 15, 10, 8, 12])[0]
    general = [count]
    if count in ("1girl", "1boy") and rng.random() < 0.8:
        general.append("solo")
    general += rng.sample(GENERAL_TAGS, rng.randint(4, 9))
    chars: list[str] = []
    copys: list[str] = []
    if count != "no_humans":
        for name, series in rng.sample(CHARACTERS, rng.choice([0, 1, 1, 1, 2])):
            chars.append(name)
            if series not in copys:
                copys.append(series)
    if not copys:
        copys = list(ORIGINALS)
    return {
        "general": sorted(set(general)),
        "character": sorted(chars),
        "copyright": sorted(copys),
        "artist": [rng.choice(ARTISTS)],
        "meta": sorted(rng.sample(META_TAGS, rng.randint(0, 3))),
    }


def _make_post(rng: random.Random, post_id: int, recipe: Recipe, *, width: int, height: int,
               ext: str, trap: str | None = None) -> FakePost:
    tags = _random_tags(rng)
    return FakePost(
        id=post_id, width=width, height=height, file_ext=ext,
        rating=rng.choices("gsqe", weights=[40, 30, 15, 15])[0],
        score=rng.randint(-3, 120), fav_count=rng.randint(0, 300),
        tags_general=tags["general"], tags_character=tags["character"],
        tags_copyright=tags["copyright"], tags_artist=tags["artist"], tags_meta=tags["meta"],
        recipe=recipe, trap=trap,
        source=f"https://www.pixiv.net/artworks/{10_000_000 + post_id * 7}" if rng.random() < 0.7 else "",
    )


def _normal_post(rng: random.Random, post_id: int) -> FakePost:
    w, h = rng.choice(SIZES)
    ext = rng.choice(IMAGE_FORMATS)
    recipe = Recipe("picture", seed=rng.randrange(2**31), size=(w, h), fmt=ext)
    return _make_post(rng, post_id, recipe, width=w, height=h, ext=ext)


def _trap_post(rng: random.Random, post_id: int, trap: str, normals: list[FakePost]) -> FakePost:
    seed = rng.randrange(2**31)
    size = rng.choice(SIZES)
    if trap in ("deleted", "md5-mismatch"):
        p = _make_post(rng, post_id, Recipe("picture", seed=seed, size=size, fmt="png"),
                       width=size[0], height=size[1], ext="png", trap=trap)
        p.is_deleted = trap == "deleted"
        return p
    if trap in NO_FILE_TRAPS:
        p = _make_post(rng, post_id, Recipe("raw", seed=seed, raw="corrupt"),
                       width=size[0], height=size[1], ext="jpg", trap=trap)
        p.has_file = False
        p.is_banned = trap == "banned"
        return p
    if trap in ("video-mp4", "video-webm", "ugoira-zip"):
        ext = {"video-mp4": "mp4", "video-webm": "webm", "ugoira-zip": "zip"}[trap]
        w, h = (1280, 720) if ext != "zip" else (600, 600)
        return _make_post(rng, post_id, Recipe("raw", seed=seed, raw=ext), width=w, height=h, ext=ext, trap=trap)
    if trap in DUPLICATE_TRAPS:
        orig = normals[-1]
        if trap == "near-resize":
            # The copy must stay >= 512 on the short side, so the original is made larger.
            orig.recipe.size = (768, 1024)
            orig.width, orig.height = 768, 1024
            # Same format as the original: the smaller copy is the worse one by every measure.
            r = Recipe("picture", seed=orig.recipe.seed, size=orig.recipe.size, fmt=orig.recipe.fmt, scale=0.9)
            w, h, ext = round(768 * 0.9), round(1024 * 0.9), orig.file_ext
        elif trap == "near-reencode":
            r = Recipe("picture", seed=orig.recipe.seed, size=orig.recipe.size, fmt="jpg", quality=60)
            w, h, ext = orig.width, orig.height, "jpg"
        else:
            r = Recipe("copy", source=orig)
            w, h, ext = orig.width, orig.height, orig.file_ext
        p = _make_post(rng, post_id, r, width=w, height=h, ext=ext, trap=trap)
        p.tags_general, p.tags_character = list(orig.tags_general), list(orig.tags_character)
        p.tags_copyright, p.tags_artist = list(orig.tags_copyright), list(orig.tags_artist)
        p.duplicate_of = orig.id
        return p
    if trap == "rgba":
        r = Recipe("picture", seed=seed, size=size, fmt="png", mode="RGBA")
    elif trap == "palette":
        r = Recipe("picture", seed=seed, size=size, fmt="png", mode="P")
    elif trap == "cmyk":
        r = Recipe("picture", seed=seed, size=size, fmt="jpg", mode="CMYK")
    elif trap == "animated-gif":
        size = (512, 512)
        r = Recipe("picture", seed=seed, size=size, fmt="gif", mode="GIF-ANIM")
    elif trap == "corrupt":
        r = Recipe("raw", seed=seed, raw="corrupt")
    elif trap == "truncated":
        r = Recipe("picture", seed=seed, size=size, fmt="png", truncate=0.6)
    elif trap == "small":
        size = (320, 448)
        r = Recipe("picture", seed=seed, size=size, fmt="png")
    else:
        raise ValueError(f"unknown trap {trap!r}")
    return _make_post(rng, post_id, r, width=size[0], height=size[1], ext=r.fmt, trap=trap)


def generate_posts(n: int, *, seed: int = 0, start_id: int = 1000, traps: bool = True) -> list[FakePost]:
    """n deterministic fixture posts with ids start_id.. (ascending), traps spread among them.

    With traps=True, one post per entry of TRAPS replaces an ordinary post, so n must be at
    least len(TRAPS) + 3. Duplicate traps copy the nearest earlier ordinary post
    (`duplicate_of`).
    """
    n_traps = len(TRAPS) if traps else 0
    if n < 0 or (traps and n < n_traps + 3):
        raise ValueError(f"n: need at least {n_traps + 3} posts to hold the {n_traps} traps (or traps=False), got {n}")
    rng = random.Random(seed)
    slots: dict[int, str] = {}
    if traps:
        for k, name in enumerate(TRAPS):
            slots[round((k + 1) * n / (n_traps + 1))] = name
    posts: list[FakePost] = []
    normals: list[FakePost] = []
    for i in range(n):
        pid = start_id + i
        if i in slots:
            posts.append(_trap_post(rng, pid, slots[i], normals))
        else:
            p = _normal_post(rng, pid)
            posts.append(p)
            normals.append(p)
    return posts


# -- search semantics ---------------------------------------------------------------------

_FAKE_METATAGS = {
    "rating", "status", "width", "height", "filetype", "score", "id", "md5", "order", "filesize",
    "mpixels", "date", "user", "fav", "pool", "parent", "source", "limit", "age", "ratio",
    "favcount", "tagcount", "child", "is", "has",
}
_RATINGS = {"g": "g", "general": "g", "s": "s", "sensitive": "s", "safe": "s", "q": "q",
            "questionable": "q", "e": "e", "explicit": "e"}


def _is_meta(token: str) -> bool:
    name, sep, value = token.lstrip("-~").partition(":")
    return bool(sep and value) and name.lower() in _FAKE_METATAGS


def _num_match(expr: str, value: int) -> bool:
    for part in expr.split(","):
        try:
            if ".." in part:
                lo, hi = part.split("..", 1)
                if (not lo or value >= int(lo)) and (not hi or value <= int(hi)):
                    return True
            elif part.startswith(">="):
                if value >= int(part[2:]):
                    return True
            elif part.startswith("<="):
                if value <= int(part[2:]):
                    return True
            elif part.startswith(">"):
                if value > int(part[1:]):
                    return True
            elif part.startswith("<"):
                if value < int(part[1:]):
                    return True
            elif value == int(part.lstrip("=")):
                return True
        except ValueError:
            raise _HttpError(422, f"invalid number in metatag value {expr!r}") from None
    return False


def _meta_match(post: FakePost, name: str, value: str) -> bool:
    name = name.lower()
    if name == "rating":
        return post.rating in {_RATINGS.get(v.lower(), v.lower()) for v in value.split(",")}
    if name == "status":
        v = value.lower()
        if v == "deleted":
            return post.is_deleted
        if v == "banned":
            return post.is_banned
        if v == "active":
            return not post.is_deleted
        return True  # any, all
    if name in ("width", "height", "score", "id"):
        return _num_match(value, {"width": post.width, "height": post.height,
                                  "score": post.score, "id": post.id}[name])
    if name == "filetype":
        exts = {"jpg" if v.lower() == "jpeg" else v.lower() for v in value.split(",")}
        return post.file_ext in exts
    if name == "md5":
        return post.md5 in value.lower().split(",")
    return True  # order:, source:, ... are accepted and ignored here


def matches(post: FakePost, tokens: list[str]) -> bool:
    """Danbooru's AND search: plain tags present, -tags absent, metatags satisfied."""
    have = set(post.tags)
    for tok in tokens:
        neg = tok.startswith("-")
        body = tok[1:] if neg else tok.lstrip("~")
        if _is_meta(tok):
            name, _, value = body.partition(":")
            ok = _meta_match(post, name, value)
        else:
            ok = body.lower() in have
        if ok == neg:
            return False
    return True


# -- the server ---------------------------------------------------------------------------

class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class RequestRecord:
    """One request as the server saw it (the Authorization value is never stored)."""

    method: str
    path: str
    raw_path: str
    query: dict[str, str]
    headers: dict[str, str]
    user_agent: str | None
    has_auth: bool
    auth_login: str | None = None
    status: int = 0
    bytes_sent: int = 0


_BLOCKED_AGENTS = ("python-requests", "python-urllib", "curl/", "wget/", "python-httpx", "go-http-client", "java/")


def user_agent_blocked(ua: str | None) -> bool:
    """Danbooru (via Cloudflare) refuses default library agents and fake browser agents."""
    if not ua or not ua.strip():
        return True
    low = ua.lower()
    return low.startswith(_BLOCKED_AGENTS) or "mozilla" in low


class FakeDanbooru:
    """A Danbooru-compatible server on 127.0.0.1 in a daemon thread.

    `credentials` maps login → api_key (Gold accounts: 6 tags). `throttle_once` answers the
    first posts.json with 429 + Retry-After: 1; `fail_once_503` answers the next one with 503;
    `flaky_download_ids` get a dropped connection half-way on their first file GET;
    `delay_once_s` makes the first posts.json answer that late (for client timeouts).

    Download traps: `oversize_ids` stream `oversize_bytes` of junk (no Content-Length) instead
    of their small declared file; `file_urls` replace a post's listed file_url (``{base}``,
    ``{port}`` are filled in, e.g. ``"ftp://{port}/x.png"`` or ``"http://localhost:{port}/..."``);
    `redirects` answer a post's file GET with a 302 to the given location (same placeholders);
    `raw_items` are listed verbatim at the top of every posts.json page (malformed posts).

    Slow servers: `trickle_ids` send their file one byte every `trickle_interval_s` after
    prompt headers, `trickle_header_ids` send even the status line and headers that way (a read
    timeout never fires: each byte resets it); both sets may be changed while running.
    `file_delays` holds a post's file answer back that many seconds (to scramble the order in
    which concurrent downloads finish); `peak_file_connections` is the most file requests
    served at once, per Host header.
    """

    GOLD_TAG_LIMIT = 6

    def __init__(
        self,
        posts: list[FakePost] | None = None,
        *,
        credentials: dict[str, str] | None = None,
        page_cap: int = 1000,
        anonymous_tag_limit: int = 2,
        throttle_once: bool = False,
        fail_once_503: bool = False,
        flaky_download_ids: set[int] | frozenset[int] | tuple[int, ...] = (),
        delay_once_s: float = 0.0,
        oversize_ids: set[int] | frozenset[int] | tuple[int, ...] = (),
        oversize_bytes: int = 300 * 1024 * 1024,
        file_urls: dict[int, str] | None = None,
        redirects: dict[int, str] | None = None,
        raw_items: list[Any] | None = None,
        trickle_ids: set[int] | frozenset[int] | tuple[int, ...] = (),
        trickle_header_ids: set[int] | frozenset[int] | tuple[int, ...] = (),
        trickle_interval_s: float = 2.0,
        file_delays: dict[int, float] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.posts: list[FakePost] = list(posts) if posts is not None else generate_posts(40, seed=seed)
        self.credentials = dict(credentials or {})
        self.page_cap = page_cap
        self.anonymous_tag_limit = anonymous_tag_limit
        self._throttle_pending = throttle_once
        self._fail_pending = fail_once_503
        self._flaky_pending = set(flaky_download_ids)
        self._delay_pending = float(delay_once_s)
        self.oversize_ids = set(oversize_ids)
        self.oversize_bytes = int(oversize_bytes)
        self.file_urls = dict(file_urls or {})
        self.redirects = dict(redirects or {})
        self.raw_items = list(raw_items or [])
        self.trickle_ids = set(trickle_ids)
        self.trickle_header_ids = set(trickle_header_ids)
        self.trickle_interval_s = float(trickle_interval_s)
        self._stopping = threading.Event()
        self.file_delays = dict(file_delays or {})
        self._file_connections: dict[str, int] = {}
        self.peak_file_connections: dict[str, int] = {}
        self._seed = seed
        self._added = 0
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> "FakeDanbooru":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = ThreadingHTTPServer((self._host, self._port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fakebooru", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # ends trickling answers
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "FakeDanbooru":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeDanbooru is not started; call start()")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    # observation and mutation
    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._requests.append(rec)

    def add_posts(self, n: int) -> list[FakePost]:
        """Append n ordinary posts with higher ids (new uploads); returns them."""
        with self._lock:
            self._added += 1
            rng = random.Random(f"{self._seed}-add-{self._added}")
            start = max((p.id for p in self.posts), default=999) + 1
            new = [_normal_post(rng, start + i) for i in range(n)]
            self.posts.extend(new)
        return new

    def post(self, post_id: int) -> FakePost | None:
        with self._lock:
            return next((p for p in self.posts if p.id == post_id), None)

    def set_throttle_once(self) -> None:
        with self._lock:
            self._throttle_pending = True

    def set_fail_once_503(self) -> None:
        with self._lock:
            self._fail_pending = True

    # request logic (called from handler threads)
    def _authenticate(self, headers: Any, query: dict[str, str]) -> tuple[bool, str | None]:
        auth = headers.get("Authorization")
        login, key = None, None
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "basic":
                raise _HttpError(401, "Authorization must be HTTP Basic login:api_key")
            try:
                login, _, key = base64.b64decode(value).decode("utf-8").partition(":")
            except ValueError:
                raise _HttpError(401, "malformed Basic authorization") from None
        elif "login" in query or "api_key" in query:
            login, key = query.get("login"), query.get("api_key")
        if login is None:
            return False, None
        if self.credentials.get(login) != key or not key:
            raise _HttpError(401, "SessionLoader::AuthenticationFailure")
        return True, login

    def _posts_json(self, query: dict[str, str], authed: bool) -> list[dict[str, Any]]:
        with self._lock:
            delay, self._delay_pending = self._delay_pending, 0.0
        if delay > 0:
            time.sleep(delay)
        with self._lock:
            if self._throttle_pending:
                self._throttle_pending = False
                raise _HttpError(429, "Too many requests", {"Retry-After": "1"})
            if self._fail_pending:
                self._fail_pending = False
                raise _HttpError(503, "Service temporarily unavailable")
            posts = sorted(self.posts, key=lambda p: p.id, reverse=True)
        tokens = query.get("tags", "").split()
        limit_allowed = self.GOLD_TAG_LIMIT if authed else self.anonymous_tag_limit
        plain = [t for t in tokens if not _is_meta(t)]
        if len(plain) > limit_allowed:
            raise _HttpError(422, f"You cannot search for more than {limit_allowed} tags at a time")
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 20
        limit = max(1, min(200, limit))
        page = query.get("page", "").strip() or "1"
        found = [p for p in posts if matches(p, tokens)]
        if page[0] in "ab" and page[1:].isdigit():
            cursor = int(page[1:])
            if page[0] == "b":
                chosen = [p for p in found if p.id < cursor][:limit]
            else:
                chosen = [p for p in reversed(found) if p.id > cursor][:limit][::-1]
        elif page.isdigit() and int(page) >= 1:
            n = int(page)
            if n > self.page_cap:
                raise _HttpError(410, f"You cannot go beyond page {self.page_cap}. Try narrowing your "
                                      f"search terms, or upgrade your account to go beyond page {self.page_cap}.")
            chosen = found[(n - 1) * limit: n * limit]
        else:
            raise _HttpError(422, f"invalid page {page!r}")
        base = self.url
        listed = []
        for p in chosen:
            item = p.to_json(base)
            if p.id in self.file_urls:
                item["file_url"] = self.fill(self.file_urls[p.id])
            listed.append(item)
        return list(self.raw_items) + listed

    def fill(self, template: str) -> str:
        """A trap URL with ``{base}`` and ``{port}`` filled in."""
        return template.replace("{base}", self.url).replace("{port}", str(self.port))

    def trickle(self, write: Any, data: bytes) -> int:
        """Write ``data`` one byte every ``trickle_interval_s`` until done, the client hangs up
        or the server stops; returns the bytes written."""
        sent = 0
        try:
            for i in range(len(data)):
                if i and self._stopping.wait(self.trickle_interval_s):
                    break
                write(data[i:i + 1])
                sent += 1
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        return sent

    def file_request(self, host: str) -> "_FileRequest":
        """Counts a file request as in progress (for ``peak_file_connections``)."""
        return _FileRequest(self, host)

    def _take_flaky(self, post_id: int) -> bool:
        with self._lock:
            if post_id in self._flaky_pending:
                self._flaky_pending.discard(post_id)
                return True
            return False


class _FileRequest:
    def __init__(self, fake: FakeDanbooru, host: str) -> None:
        self.fake, self.host = fake, host

    def __enter__(self) -> None:
        fake = self.fake
        with fake._lock:
            now = fake._file_connections.get(self.host, 0) + 1
            fake._file_connections[self.host] = now
            fake.peak_file_connections[self.host] = max(now, fake.peak_file_connections.get(self.host, 0))

    def __exit__(self, *exc: object) -> None:
        with self.fake._lock:
            self.fake._file_connections[self.host] -= 1


def _make_handler(fake: FakeDanbooru) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fakebooru/1"
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in self.headers.items()}
            rec = RequestRecord(method="GET", path=parts.path, raw_path=self.path, query=query,
                                headers=headers, user_agent=self.headers.get("User-Agent"),
                                has_auth="Authorization" in self.headers)
            fake._record(rec)
            try:
                if user_agent_blocked(rec.user_agent):
                    raise _HttpError(403, "Forbidden: use a descriptive User-Agent naming your tool")
                authed, rec.auth_login = fake._authenticate(self.headers, query)
                path = unquote(parts.path)
                if path in ("/posts.json", "/posts"):
                    self._json(rec, 200, fake._posts_json(query, authed))
                elif path.startswith("/posts/") and path.endswith(".json"):
                    post = fake.post(int(path[len("/posts/"):-5])) if path[7:-5].isdigit() else None
                    if post is None:
                        raise _HttpError(404, "That record was not found.")
                    self._json(rec, 200, post.to_json(fake.url))
                elif path.startswith("/data/"):
                    with fake.file_request((self.headers.get("Host") or "").rsplit(":", 1)[0]):
                        self._file(rec, path[len("/data/"):])
                else:
                    raise _HttpError(404, "Not found")
            except _HttpError as err:
                self._json(rec, err.status, {"success": False, "error": type(err).__name__,
                                             "message": err.message}, err.headers)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _json(self, rec: RequestRecord, status: int, body: Any, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            rec.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _file(self, rec: RequestRecord, name: str) -> None:
            stem = name.rsplit(".", 1)[0]
            post = fake.post(int(stem)) if stem.isdigit() else None
            if post is None or not post.has_file or name != post.filename:
                raise _HttpError(404, "Not found")
            if post.id in fake.redirects:
                rec.status = 302
                self.send_response(302)
                self.send_header("Location", fake.fill(fake.redirects[post.id]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if post.id in fake.oversize_ids:
                self._stream_junk(rec, fake.oversize_bytes)
                return
            if fake.file_delays.get(post.id):
                fake._stopping.wait(fake.file_delays[post.id])
            if post.id in fake.trickle_header_ids:
                rec.status = 200
                head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(post.data)}\r\n\r\n".encode()
                fake.trickle(self._write_flush, head + post.data)
                self.close_connection = True
                return
            data = post.data
            flaky = fake._take_flaky(post.id)
            rec.status = 200
            self.send_response(200)
            ctype = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                     "mp4": "video/mp4", "webm": "video/webm", "zip": "application/zip"}.get(post.file_ext,
                                                                                           "application/octet-stream")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if flaky:  # the connection drops half-way
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if post.id in fake.trickle_ids:
                self.wfile.flush()
                rec.bytes_sent = fake.trickle(self._write_flush, data)
                self.close_connection = True
                return
            self.wfile.write(data)
            rec.bytes_sent = len(data)

        def _write_flush(self, data: bytes) -> None:
            self.wfile.write(data)
            self.wfile.flush()

        def _stream_junk(self, rec: RequestRecord, total: int) -> None:
            """Far more bytes than the post declares, without a Content-Length (HTTP/1.0: the
            body ends when the connection closes). Counts what was written before the client
            hung up."""
            rec.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\x89PNG" + bytes(64 * 1024 - 4)
            try:
                while rec.bytes_sent < total:
                    self.wfile.write(chunk)
                    rec.bytes_sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora.testing.fakebooru",
                                     description="Run the Danbooru-compatible loopback server in the foreground.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--posts", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-traps", action="store_true", help="only ordinary posts")
    parser.add_argument("--account", action="append", default=[], metavar="LOGIN:KEY",
                        help="accept this login/API key (repeatable)")
    args = parser.parse_args(argv)
    try:
        posts = generate_posts(args.posts, seed=args.seed, traps=not args.no_traps)
    except ValueError as exc:
        parser.error(str(exc))
    creds = dict(a.split(":", 1) for a in args.account if ":" in a)
    fake = FakeDanbooru(posts, credentials=creds, host=args.host, port=args.port, seed=args.seed).start()
    print(f"fakebooru listening on {fake.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
