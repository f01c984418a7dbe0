"""Defensive image loading, normalisation to RGB, aspect-ratio buckets and perceptual hashes.

Why this module exists: files from an image board (or a user's folder) are untrusted. They can be
corrupt, truncated, decompression bombs, animated, CMYK, 16-bit or carry alpha. Everything that
enters a data set goes through :func:`load_image`, which either returns a plain 8-bit RGB image
(alpha flattened onto white, EXIF orientation applied) or raises :class:`ImageRejected` with a short
machine-readable ``reason`` the manifest can record.

Training does the final crop/resize per bucket; here we only *assign* the bucket and store the
normalised image (never upscaled).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora.fsutil import atomic_write_bytes  # re-exported: refresh and captions import it from here

__all__ = [
    "ImageRejected",
    "PreparedImage",
    "make_buckets",
    "nearest_bucket",
    "load_image",
    "to_rgb",
    "prepare_image",
    "compute_phash",
    "phash_to_int",
    "int_to_phash",
    "atomic_write_bytes",
    "DEFAULT_MAX_PIXELS",
]

DEFAULT_MAX_PIXELS = 150_000_000
"""Default decompression-bomb limit, in pixels (150 MP, e.g. 12000x12500).

Real large images pass: an 8000x8000 scan is 64 MP, Danbooru's largest illustrations are a few
tens of MP. Decoding 150 MP as RGB needs ~450 MB, which a training machine has; a bomb claims
thousands of MP. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, ~89 MP, refusing at twice that)
would reject some legitimate images first, so a larger limit asked for here raises it too."""

PNG_COMPRESS_LEVEL = 3
"""zlib level for stored PNGs: level 6 (Pillow's default) costs ~2x the time for ~5% smaller files."""

WHITE = (255, 255, 255)

# Modes that carry an alpha channel and must be flattened onto white.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Modes whose embedded ICC profile (if any) describes an RGB colour space.
_RGB_SPACE_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA"}
# Integer / float single-channel modes wider than 8 bits.
_WIDE_MODES_PREFIX = ("I;16", "I", "F")


class ImageRejected(Exception):
    """An image that cannot enter the data set.

    ``reason`` is a short stable code for manifests and summaries:
    ``corrupt``, ``truncated``, ``decompression-bomb``, ``too-small``, ``unsupported-mode``.
    ``str(exc)`` is a readable sentence naming the source.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep pickling (multiprocessing, Prefect results) working
        return (type(self), (self.reason, str(self)))


@dataclass
class PreparedImage:
    """The stored, normalised image: where it is, its size, bucket and perceptual hash.

    ``phash`` is 16 lowercase hex chars (64-bit imagehash.phash of the alpha-flattened image).
    ``animated`` is True when the source had several frames and frame 0 was kept.
    """

    path: Path
    width: int
    height: int
    bucket: tuple[int, int]
    phash: str
    animated: bool


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def make_buckets(
    resolution: int = 512, *, min_side: int = 256, max_side: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya's sd-scripts builds them, as sorted ``(width, height)``.

    The area budget is counted in ``step``-sized units, ``(resolution // step) ** 2``, so every
    bucket satisfies ``width * height <= resolution ** 2``. The square bucket is always present;
    then for each width from ``min_side`` to ``max_side`` (in steps) the largest height that fits
    the budget (capped at ``max_side``) is added together with its transpose. For 512 this gives
    512x512, 448x576, 384x640, 320x704, 320x768, 256x832 ... 256x1024 and their transposes.
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than step {step}")
    if min_side > max_side:
        raise ValueError(f"min_side {min_side} is larger than max_side {max_side}")
    if min_side % step or max_side % step:
        raise ValueError(f"min_side {min_side} and max_side {max_side} must be multiples of step {step}")

    units = resolution // step
    max_area_units = units * units
    buckets: set[tuple[int, int]] = set()
    square = units * step
    if min_side <= square <= max_side:
        buckets.add((square, square))
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area_units // (width // step)) * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    if not buckets:
        raise ValueError(
            f"no bucket fits resolution {resolution} with sides in [{min_side}, {max_side}] step {step}"
        )
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width/height`` (distance in log ratio).

    Ties (only possible with duplicate ratios) go to the larger area, then to the earlier bucket.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets given")
    target = math.log(width / height)
    best = None
    best_key = None
    for i, (bw, bh) in enumerate(buckets):
        key = (abs(math.log(bw / bh) - target), -(bw * bh), i)
        if best_key is None or key < best_key:
            best_key, best = key, (int(bw), int(bh))
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _describe(source: Path | bytes) -> str:
    return f"{len(source)} bytes of image data" if isinstance(source, (bytes, bytearray)) else str(source)


def _read_source(source: Path | bytes | str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()  # FileNotFoundError propagates: a caller bug
    except IsADirectoryError as exc:
        raise ImageRejected("corrupt", f"{source} is a directory, not an image file") from exc


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale to 8-bit L (Pillow's own convert clips instead of scaling)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    elif img.mode == "F":
        a = arr.astype(np.float64)
        if np.nanmax(a) <= 1.0:  # float images are usually 0..1
            a = a * 255.0
        arr8 = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    else:  # "I": 32-bit ints, in practice 16-bit data (0..65535)
        a = arr.astype(np.int64)
        if a.max(initial=0) > 255:
            a = a >> 8
        arr8 = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image to 8-bit RGB; alpha (including palette/tRNS transparency) onto white.

    Raises ``ImageRejected("unsupported-mode")`` for modes Pillow cannot convert.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    try:
        if mode in _ALPHA_MODES:
            return _flatten_alpha(img)
        if "transparency" in img.info and mode in {"P", "L", "RGB", "1", "I", "I;16"}:
            if mode.startswith("I"):
                img = _wide_to_l(img)  # tRNS on 16-bit grey is rare; drop it after scaling
                return img.convert("RGB")
            return _flatten_alpha(img)
        if mode == "P":
            # A palette may itself hold alpha (PA-less RGBA palettes): convert via RGBA.
            if img.palette is not None and img.palette.mode == "RGBA":
                return _flatten_alpha(img)
            return img.convert("RGB")
        if mode.startswith(_WIDE_MODES_PREFIX):
            return _wide_to_l(img).convert("RGB")
        # CMYK, L, 1, YCbCr, LAB, HSV ...
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported-mode", f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def _let_pillow_open(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb guard so it never refuses what ``max_pixels`` allows.

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` before we see their size; our
    own check (below) is the one that decides. The guard only ever goes up, so concurrent calls
    with different limits cannot make it refuse an allowed image."""
    guard = Image.MAX_IMAGE_PIXELS
    if guard is not None and max_pixels > 2 * guard:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1


def _open(data: bytes, what: str, max_pixels: int) -> tuple[Image.Image, bool, str | None]:
    """Open and fully decode frame 0. Returns (image, animated, format)."""
    _let_pillow_open(max_pixels)
    # No warnings.catch_warnings() here: it is not thread-safe, and callers may prepare images
    # in threads. Pillow's DecompressionBombWarning (over ~89 MP) is rare and harmless to show.
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression-bomb", f"{what} declares too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("corrupt", f"{what} is not in a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("corrupt", f"{what} is not a readable image: {exc}") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"{what} declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression-bomb",
            f"{what} declares too many pixels: {width}x{height} = {width * height}, over the limit of {max_pixels}",
        )
    fmt = img.format
    try:
        # n_frames may scan the whole file, so it belongs inside the decode guard
        animated = bool(getattr(img, "is_animated", False)) and getattr(img, "n_frames", 1) > 1
        if animated:
            img.seek(0)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression-bomb", f"{what} declares too many pixels: {exc}") from exc
    except MemoryError as exc:
        raise ImageRejected("decompression-bomb", f"{what} needs too much memory to decode") from exc
    except Exception as exc:  # any decoder failure on untrusted bytes means "unusable file"
        text = str(exc)
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            raise ImageRejected("truncated", f"{what} is truncated: {text}") from exc
        raise ImageRejected("corrupt", f"{what} cannot be decoded: {type(exc).__name__}: {text}") from exc
    return img, animated, fmt


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # malformed EXIF blocks are common; orientation is then unknown
        return None


def load_image(source: Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an untrusted image and return it as a fully decoded 8-bit RGB image.

    - unreadable / not an image -> ``ImageRejected("corrupt")``
    - data ends early -> ``ImageRejected("truncated")`` (decoding is forced, not lazy)
    - more than ``max_pixels`` pixels -> ``ImageRejected("decompression-bomb")`` (checked from the
      header, before decoding)
    - animated (GIF/APNG/WebP) -> frame 0; the returned image has ``info["animated"] = True``
    - CMYK, 16-bit, L, LA, P (with transparency), RGBA -> RGB, alpha flattened onto white
    - EXIF orientation is applied (a malformed EXIF block is ignored)

    The returned image also has ``info["format"]`` (e.g. "JPEG", "PNG") and
    ``info["source_mode"]`` (the mode before conversion). ``FileNotFoundError`` propagates: a
    missing file is a caller bug, not a bad image.
    """
    what = _describe(source)
    data = _read_source(source)
    return _load_from_bytes(data, what, max_pixels)


def _load_from_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    img, animated, fmt = _open(data, what, max_pixels)
    source_mode = img.mode
    orientation = _exif_orientation(img)
    if orientation not in (None, 1):
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block must not lose an otherwise good image
            pass
    rgb = to_rgb(img)
    if rgb is img:
        rgb = img.copy() if animated else img
    if source_mode not in _RGB_SPACE_MODES:
        # A CMYK or grey ICC profile does not describe the converted RGB pixels; keeping it would
        # make viewers and trainers that honour ICC show wrong colours.
        rgb.info.pop("icc_profile", None)
    rgb.info["animated"] = animated
    rgb.info["format"] = fmt
    rgb.info["source_mode"] = source_mode
    rgb.info["exif_orientation"] = orientation
    return rgb


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def compute_phash(img: Image.Image) -> str:
    """64-bit ``imagehash.phash`` as 16 hex chars, always on the alpha-flattened RGB image.

    phash itself converts to grey and ignores alpha, so a transparent-background image would
    otherwise hash like its (arbitrary) hidden colour; flattening first makes it match the
    stored image.
    """
    if img.mode != "RGB" or "transparency" in img.info:
        img = to_rgb(img)
    return str(imagehash.phash(img))


def phash_to_int(h: str) -> int:
    """Hex phash (as :func:`compute_phash` returns) to an unsigned 64-bit int."""
    value = int(h, 16)
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"phash {h!r} is not a 64-bit hex value")
    return value


def int_to_phash(value: int) -> str:
    """Inverse of :func:`phash_to_int`."""
    return f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def prepare_image(
    source: Path | bytes,
    dest_stem: Path,
    *,
    min_side: int = 512,
    buckets: Sequence[tuple[int, int]] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Load, check, hash and store one image as ``dest_stem.jpg`` or ``dest_stem.png``.

    - short side under ``min_side`` -> ``ImageRejected("too-small")`` (never upscaled)
    - an RGB, single-frame JPEG without a rotating EXIF orientation keeps its exact bytes
      (``.jpg``, no re-encode loss); everything else is stored as PNG of the normalised RGB image
    - the bucket is chosen from ``buckets`` (default: kohya's 512 set, :func:`make_buckets`)
    - the write is atomic; nothing is written when the image is rejected

    ``dest_stem`` is a path without suffix, e.g. ``images/12345``.
    """
    what = _describe(source)
    data = _read_source(source)
    img = _load_from_bytes(data, what, max_pixels)
    width, height = img.size
    if min(width, height) < min_side:
        raise ImageRejected(
            "too-small",
            f"{what} is {width}x{height}; its short side {min(width, height)} is under the minimum {min_side}",
        )
    phash = compute_phash(img)
    bucket = nearest_bucket(width, height, buckets if buckets is not None else make_buckets())

    animated = bool(img.info.get("animated"))
    keep_bytes = (
        img.info.get("format") == "JPEG"
        and img.info.get("source_mode") == "RGB"
        and not animated
        and img.info.get("exif_orientation") in (None, 1)
    )
    dest_stem = Path(dest_stem)
    if keep_bytes:
        dest = Path(f"{dest_stem}.jpg")
        payload = data
    else:
        dest = Path(f"{dest_stem}.png")
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        payload = buf.getvalue()
    atomic_write_bytes(dest, payload)
    return PreparedImage(path=dest, width=width, height=height, bucket=bucket, phash=phash, animated=animated)
