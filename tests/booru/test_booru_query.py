"""Query building: free metatags, the anonymous 2-tag limit, rating letters."""
from __future__ import annotations

import pytest

from lora.booru import BooruQueryError, build_query, count_user_tags


def test_build_query_emits_user_tags_then_filters() -> None:
    q = build_query("1girl solo", ratings=["g", "s"], min_width=512, min_height=512)
    assert q == "1girl solo -status:deleted rating:g,s width:>=512 height:>=512 filetype:jpg,png,webp"


def test_rating_words_map_to_letters_and_safe_means_sensitive() -> None:
    q = build_query(["landscape"], ratings=["general", "safe", "Explicit"], filetypes=None)
    assert q == "landscape -status:deleted rating:g,s,e"
    assert "rating:s" in build_query("x", ratings=["sensitive"])


def test_unknown_rating_is_refused_naming_the_field() -> None:
    with pytest.raises(BooruQueryError, match="ratings: unknown rating 'pg13'"):
        build_query("x", ratings=["pg13"])


def test_metatags_do_not_count_but_colon_tags_do() -> None:
    assert count_user_tags("1girl solo rating:g -status:deleted width:>=512 score:>10 order:id") == 2
    # ':d' and 're:zero' are ordinary tags that happen to contain a colon
    assert count_user_tags(":d re:zero_kara_hajimeru_isekai_seikatsu") == 2
    # two user tags plus any number of metatags is fine anonymously
    build_query("1girl solo score:>10 md5:abc", ratings=["g"], min_width=512)


def test_third_tag_refused_with_what_to_do() -> None:
    with pytest.raises(BooruQueryError) as info:
        build_query("1girl solo smile")
    msg = str(info.value)
    assert "Danbooru allows 2 tags for anonymous/Member accounts" in msg
    assert "DANBOORU_LOGIN" in msg and "DANBOORU_API_KEY" in msg and "Gold allows 6" in msg
    assert "metatags like rating: don't count" in msg


def test_no_limit_when_credentials_exist() -> None:
    q = build_query("1girl solo smile long_hair", max_user_tags=None, filetypes=None, exclude_deleted=False)
    assert q == "1girl solo smile long_hair"


def test_existing_status_and_filetype_are_not_doubled() -> None:
    q = build_query("sketch status:any filetype:png")
    assert q == "sketch status:any filetype:png"
    assert build_query("sketch", filetypes=[".JPEG", "png", "jpg"]).endswith("filetype:jpg,png")


def test_bad_min_width_names_the_field() -> None:
    with pytest.raises(BooruQueryError, match="min_width"):
        build_query("x", min_width=-5)
