"""Kohya-style captions from Danbooru tags (lora/data/captions.py)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from lora.data.captions import (
    CaptionOptions,
    TagSet,
    build_caption,
    normalize_tag,
    read_caption,
    write_caption,
)


@dataclass
class FakePost:  # the shape of the booru client's Post (duck-typed)
    tags_general: str
    tags_character: str
    tags_copyright: str
    tags_artist: str
    tags_meta: str


POST = FakePost(
    tags_general="blue_eyes hatsune_miku_(cosplay) long_hair smile solo 1girl ^_^ twintails",
    tags_character="hatsune_miku",
    tags_copyright="vocaloid",
    tags_artist="some_artist",
    tags_meta="highres commentary_request absurdres",
)


def test_order_trigger_counts_character_copyright_general():
    caption = build_caption(TagSet.from_post(POST), CaptionOptions(trigger_word="mikustyle"))
    assert caption == (
        "mikustyle, solo, 1girl, hatsune miku, vocaloid, blue eyes, hatsune miku (cosplay), "
        "long hair, smile, ^_^, twintails"
    )


def test_meta_dropped_and_artist_only_on_request():
    tags = TagSet.from_post(POST)
    plain = build_caption(tags)
    assert "highres" not in plain and "commentary" not in plain and "absurdres" not in plain
    assert "some artist" not in plain
    styled = build_caption(tags, CaptionOptions(include_artist=True))
    assert styled.split(", ")[:5] == ["solo", "1girl", "hatsune miku", "vocaloid", "some artist"]


@pytest.mark.parametrize(
    "tag, expected",
    [("long_hair", "long hair"), ("^_^", "^_^"), ("o_o", "o_o"), (">_<", ">_<"),
     ("^_^;", "^_^;"), ("hatsune_miku_(cosplay)", "hatsune miku (cosplay)"),
     ("  spaced  ", "spaced"), ("star_(symbol)", "star (symbol)")],
)
def test_normalize_tag(tag, expected):
    assert normalize_tag(tag) == expected


def test_blacklist_matches_with_or_without_underscores():
    caption = build_caption(
        TagSet.from_post(POST), CaptionOptions(blacklist=["long hair", "blue_eyes", "VOCALOID"])
    )
    assert "long hair" not in caption and "blue eyes" not in caption and "vocaloid" not in caption
    assert "smile" in caption
    # one comma-separated string works too, not character by character
    caption = build_caption(TagSet.from_post(POST), CaptionOptions(blacklist="smile, twintails"))
    assert "smile" not in caption and "twintails" not in caption and "long hair" in caption


def test_max_tags_keeps_the_head_and_the_trigger_word():
    tags = TagSet.from_post(POST)
    caption = build_caption(tags, CaptionOptions(trigger_word="tw", max_tags=3))
    assert caption == "tw, solo, 1girl, hatsune miku"
    assert build_caption(tags, CaptionOptions(trigger_word="tw", max_tags=0)) == "tw"


def test_repeats_removed_and_trigger_not_doubled():
    tags = TagSet(general=["smile", "1girl", "smile", "my_style"], character=["ab_cd"], copyright=["ab cd"])
    assert build_caption(tags, CaptionOptions(trigger_word="my style")) == "my style, 1girl, ab cd, smile"


def test_from_tag_string_detects_meta_and_count_tags():
    tags = TagSet.from_tag_string(
        "1girl absurdres bad_pixiv_id commentary_request highres jpeg_artifacts lowres "
        "md5_mismatch multiple_boys 2boys tagme translated translation_request red_hair solo"
    )
    assert build_caption(tags) == "1girl, multiple boys, 2boys, solo, red hair"
    assert "highres" in tags.meta and "translation_request" in tags.meta


def test_from_tag_string_accepts_a_comma_separated_caption():
    tags = TagSet.from_tag_string("1girl, long hair, highres, smile")
    assert build_caption(tags) == "1girl, long hair, smile"


def test_no_humans_counts_and_dict_posts():
    post = {"tag_string_general": "scenery no_humans sky", "tag_string_meta": "highres",
            "tag_string_character": "", "tag_string_copyright": "original", "tag_string_artist": "x"}
    assert build_caption(TagSet.from_post(post)) == "no humans, original, scenery, sky"


def test_shuffle_moves_only_general_tags_and_is_seeded():
    tags = TagSet(general=[f"tag_{i}" for i in range(20)] + ["1girl"], character=["c"])
    a = build_caption(tags, CaptionOptions(trigger_word="t", shuffle=True, seed=1)).split(", ")
    b = build_caption(tags, CaptionOptions(trigger_word="t", shuffle=True, seed=1)).split(", ")
    c = build_caption(tags, CaptionOptions(trigger_word="t", shuffle=True, seed=2)).split(", ")
    assert a == b and a != c
    assert a[:3] == ["t", "1girl", "c"]
    assert sorted(a[3:]) == sorted(f"tag {i}" for i in range(20))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="max_tags"):
        CaptionOptions(max_tags=-1)
    with pytest.raises(ValueError, match="trigger_word"):
        CaptionOptions(trigger_word="a, b")


def test_caption_file_round_trip_is_atomic(tmp_path):
    path = tmp_path / "images" / "12.txt"
    write_caption(path, "tw, 1girl, smile")
    assert read_caption(path) == "tw, 1girl, smile"
    assert path.read_text(encoding="utf-8") == "tw, 1girl, smile\n"
    write_caption(path, "tw, 2girls")
    assert read_caption(path) == "tw, 2girls"
    assert [p.name for p in path.parent.iterdir()] == ["12.txt"]
    with pytest.raises(ValueError):
        write_caption(path, "two\nlines")
    assert read_caption(path) == "tw, 2girls"
