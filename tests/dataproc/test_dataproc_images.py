"""Image traps, normalisation, buckets, phash and stored files (lora/data/images.py)."""
from __future__ import annotations

import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora.data.dedup import hamming
from lora.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    compute_phash,
    int_to_phash,
    load_image,
    make_buckets,
    nearest_bucket,
    phash_to_int,
    prepare_image,
)

# ------------------------------------------------------------------ traps -> RGB or a reason


def test_corrupt_bytes_are_rejected_as_corrupt(tmp_path):
    with pytest.raises(ImageRejected) as exc:
        load_image(b"<html>this is an error page, not a picture</html>")
    assert exc.value.reason == "corrupt"
    assert "recognised image format" in str(exc.value)
    bad = tmp_path / "1.png"
    bad.write_bytes(b"")
    with pytest.raises(ImageRejected) as exc:
        load_image(bad)
    assert exc.value.reason == "corrupt" and str(bad) in str(exc.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_rejected_as_truncated(picture, encoded, fmt):
    data = encoded(picture(1), fmt)
    with pytest.raises(ImageRejected) as exc:
        load_image(data[: len(data) // 2])
    assert exc.value.reason == "truncated"


def test_decompression_bomb_rejected_before_decoding(picture, encoded):
    data = encoded(picture(2, (640, 512)), "PNG")
    with pytest.raises(ImageRejected) as exc:
        load_image(data, max_pixels=640 * 512 - 1)
    assert exc.value.reason == "decompression-bomb"
    assert "640x512" in str(exc.value)
    assert load_image(data, max_pixels=640 * 512).size == (640, 512)


@pytest.mark.parametrize("side", [13000, 30000])  # over our 150 MP default / over Pillow's own limit
def test_header_claiming_huge_size_is_a_bomb(picture, encoded, side):
    # A small PNG whose IHDR claims 30000 x 30000 pixels (valid CRC): must be refused from the
    # header alone, without allocating 900 MB.
    data = bytearray(encoded(picture(12, (64, 64)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageRejected) as exc:
        load_image(bytes(data))
    assert exc.value.reason == "decompression-bomb"
    assert "too many pixels" in str(exc.value)


@pytest.mark.parametrize("side", [8000, 12000])
def test_a_large_real_image_size_is_not_a_bomb(picture, encoded, side):
    # 8000 x 8000 = 64 MP (a real scan or a large illustration; the project used to refuse
    # anything over 40 MP) and 144 MP pass the size check and are decoded; this header's
    # pixel data is missing, so decoding then finds it truncated: not a bomb.
    data = bytearray(encoded(picture(12, (64, 64)), "PNG"))
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageRejected) as exc:
        load_image(bytes(data))
    assert exc.value.reason in ("truncated", "corrupt")
    assert DEFAULT_MAX_PIXELS >= side * side


def test_truncated_animated_gif_is_rejected(picture, encoded):
    frames = [picture(20 + i).convert("P") for i in range(3)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageRejected) as exc:
        load_image(data[: len(data) // 4])
    assert exc.value.reason == "truncated"


def test_animated_gif_gives_frame_zero_and_is_flagged(encoded):
    red = Image.new("RGB", (600, 600), (255, 0, 0))
    blue = Image.new("RGB", (600, 600), (0, 0, 255))
    data = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    img = load_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((10, 10)) == (255, 0, 0)
    assert img.info["animated"] is True
    still = load_image(encoded(red, "PNG"))
    assert still.info["animated"] is False


def test_cmyk_jpeg_becomes_rgb_with_the_same_colours(picture, encoded):
    src = picture(3)
    data = encoded(src.convert("CMYK"), "JPEG", quality=95)
    img = load_image(data)
    assert img.mode == "RGB" and img.size == src.size
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(src, dtype=int)).mean()
    assert diff < 8


def test_palette_with_transparency_flattens_onto_white(encoded):
    img = Image.new("P", (600, 600), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * (254 * 3))
    img.paste(1, (300, 0, 600, 600))  # right half: opaque red index 1
    data = encoded(img, "PNG", transparency=0)  # index 0 (black) is transparent
    out = load_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((10, 10)) == (255, 255, 255)
    assert out.getpixel((500, 10)) == (200, 30, 30)


def test_rgba_transparent_pixel_becomes_white(encoded):
    img = Image.new("RGBA", (600, 600), (0, 0, 0, 0))  # transparent black
    img.paste((10, 120, 10, 255), (0, 0, 300, 600))  # opaque green left half
    img.putpixel((400, 400), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = load_image(encoded(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((500, 10)) == (255, 255, 255)
    assert out.getpixel((10, 10)) == (10, 120, 10)
    assert all(120 <= v <= 135 for v in out.getpixel((400, 400)))


def test_la_grey_with_alpha_flattens_onto_white(encoded):
    img = Image.new("LA", (600, 600), (100, 255))
    img.paste((0, 0), (0, 0, 100, 100))  # transparent black corner
    out = load_image(encoded(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((300, 300)) == (100, 100, 100)


def test_16_bit_grey_is_scaled_not_clipped(encoded):
    arr = np.zeros((600, 600), dtype=np.uint16)
    arr[:, 200:400] = 32768
    arr[:, 400:] = 65535
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = load_image(encoded(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((10, 10)) == (0, 0, 0)
    assert out.getpixel((300, 10)) == (128, 128, 128)
    assert out.getpixel((500, 10)) == (255, 255, 255)


def test_grey_jpeg_and_exif_orientation(picture, encoded):
    grey = load_image(encoded(picture(4).convert("L"), "JPEG"))
    assert grey.mode == "RGB"
    src = picture(5, (600, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = load_image(encoded(src, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (800, 600)


def test_missing_file_is_a_caller_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")


# ------------------------------------------------------------------ prepare_image


def test_too_small_is_rejected_and_nothing_written(tmp_path, picture, encoded):
    data = encoded(picture(6, (800, 500)), "PNG")
    with pytest.raises(ImageRejected) as exc:
        prepare_image(data, tmp_path / "7", min_side=512)
    assert exc.value.reason == "too-small"
    assert "500" in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    ok = prepare_image(data, tmp_path / "7", min_side=500)
    assert (ok.width, ok.height) == (800, 500)  # never resized


def test_rgb_jpeg_bytes_are_kept_exactly(tmp_path, picture, encoded):
    data = encoded(picture(7, (768, 512)), "JPEG", quality=88)
    src = tmp_path / "src.jpg"
    src.write_bytes(data)
    out_dir = tmp_path / "images"
    prepared = prepare_image(src, out_dir / "123")
    assert prepared.path == out_dir / "123.jpg"
    assert prepared.path.read_bytes() == data
    assert (prepared.width, prepared.height) == (768, 512)
    assert prepared.bucket == (640, 384)
    assert len(prepared.phash) == 16 and int(prepared.phash, 16) >= 0
    assert prepared.animated is False
    assert sorted(p.name for p in out_dir.iterdir()) == ["123.jpg"]  # no temp files left


def test_png_with_alpha_is_stored_as_flattened_png(tmp_path, encoded):
    img = Image.new("RGBA", (640, 640), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (0, 0, 320, 640))
    prepared = prepare_image(encoded(img, "PNG"), tmp_path / "9")
    assert prepared.path == tmp_path / "9.png"
    stored = Image.open(prepared.path)
    assert stored.mode == "RGB"
    assert stored.getpixel((600, 10)) == (255, 255, 255)
    assert stored.getpixel((10, 10)) == (200, 0, 0)
    assert prepared.bucket == (512, 512)
    assert [p.name for p in tmp_path.iterdir()] == ["9.png"]


def test_cmyk_and_animated_sources_are_reencoded_to_png(tmp_path, picture, encoded):
    cmyk_bytes = encoded(picture(8).convert("CMYK"), "JPEG", icc_profile=b"a CMYK profile")
    cmyk = prepare_image(cmyk_bytes, tmp_path / "c")
    assert cmyk.path.suffix == ".png"
    stored = Image.open(cmyk.path)
    assert stored.mode == "RGB" and "icc_profile" not in stored.info  # CMYK ICC would mislead
    frames = [picture(9).convert("P"), picture(10).convert("P")]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    anim = prepare_image(gif, tmp_path / "a")
    assert anim.animated is True and anim.path.suffix == ".png"
    assert Image.open(anim.path).n_frames == 1


def test_failed_write_leaves_no_temporary_file(tmp_path, picture, encoded):
    (tmp_path / "5.png").mkdir()  # the destination cannot be replaced
    with pytest.raises(OSError):
        prepare_image(encoded(picture(11), "PNG"), tmp_path / "5")
    assert [p.name for p in tmp_path.iterdir()] == ["5.png"]


def test_rejection_reason_survives_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(ImageRejected("truncated", "x is truncated")))
    assert exc.reason == "truncated" and str(exc) == "x is truncated"


# ------------------------------------------------------------------ buckets

KOHYA_512 = {
    (512, 512), (448, 576), (384, 640), (320, 704), (320, 768), (256, 832),
    (256, 896), (256, 960), (256, 1024),
}


def test_buckets_for_512_match_kohya():
    buckets = make_buckets(512)
    expected = KOHYA_512 | {(h, w) for w, h in KOHYA_512}
    assert set(buckets) == expected
    assert buckets == sorted(buckets)
    for w, h in buckets:
        assert w * h <= 512 * 512
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w % 64 == 0 and h % 64 == 0
        # the height is the largest that fits for this width
        assert h == 1024 or w * (h + 64) > 512 * 512 or (h, w) in buckets


def test_buckets_for_a_tiny_model():
    buckets = make_buckets(64, step=8, min_side=32, max_side=128)
    assert (64, 64) in buckets and (32, 128) in buckets and (128, 32) in buckets
    for w, h in buckets:
        assert w * h <= 64 * 64 and 32 <= min(w, h) and max(w, h) <= 128
        assert w % 8 == 0 and h % 8 == 0


def test_bad_bucket_arguments_are_refused():
    with pytest.raises(ValueError):
        make_buckets(512, min_side=300)
    with pytest.raises(ValueError):
        make_buckets(512, min_side=1024, max_side=256)


@pytest.mark.parametrize(
    "size, bucket",
    [((1000, 1000), (512, 512)), ((1920, 1080), (640, 384)), ((600, 1200), (320, 704)),
     ((768, 512), (640, 384)), ((1100, 1000), (512, 512)), ((300, 3000), (256, 1024))],
)
def test_nearest_bucket_by_aspect_ratio(size, bucket):
    assert nearest_bucket(*size, make_buckets(512)) == bucket


# ------------------------------------------------------------------ phash


def test_phash_survives_reencoding_and_resizing_but_separates_pictures(picture, encoded):
    pictures = [picture(100 + i, (768, 512)) for i in range(12)]
    hashes = [phash_to_int(compute_phash(p)) for p in pictures]
    for p, h in zip(pictures, hashes):
        jpeg = load_image(encoded(p, "JPEG", quality=80))
        smaller = p.resize((691, 461), Image.Resampling.LANCZOS)  # 90 %
        assert hamming(h, phash_to_int(compute_phash(jpeg))) <= 4
        assert hamming(h, phash_to_int(compute_phash(smaller))) <= 4
    for a, b in itertools.combinations(hashes, 2):
        assert hamming(a, b) > 4


def test_phash_ignores_the_hidden_colour_of_transparent_pixels():
    a = Image.new("RGBA", (600, 600), (0, 0, 0, 0))
    b = Image.new("RGBA", (600, 600), (255, 0, 255, 0))
    for img in (a, b):
        img.paste((30, 60, 200, 255), (100, 100, 400, 500))
    assert compute_phash(a) == compute_phash(b)
    white = Image.new("RGB", (600, 600), (255, 255, 255))
    white.paste((30, 60, 200), (100, 100, 400, 500))
    assert compute_phash(a) == compute_phash(white)


def test_phash_hex_round_trip():
    assert phash_to_int("ffffffffffffffff") == 2**64 - 1
    assert int_to_phash(phash_to_int("00ff00ff00ff00ff")) == "00ff00ff00ff00ff"
    with pytest.raises(ValueError):
        phash_to_int("1" * 17)
