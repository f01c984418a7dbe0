"""Building Danbooru tag queries: the user's tags plus free metatags.

Danbooru limits how many *tags* an anonymous or Member account may search (2; Gold 6), but
metatags (`rating:`, `status:`, `width:` ...) are free. So the filters that keep junk out of a
training set (deleted posts, wrong ratings, small images, videos) are added as metatags and the
user's tag budget is spent only on what they asked for.
"""
from __future__ import annotations

from collections.abc import Sequence

from lora.booru.errors import TAG_LIMIT_HINT, BooruQueryError

# Danbooru's metatag names (app/logic/post_query_builder.rb, help:cheatsheet). A token
# `name:value` with one of these names is a metatag; anything else with a colon (":d",
# "re:zero...") is an ordinary tag.
METATAGS: frozenset[str] = frozenset(
    """
    rating status width height filetype filesize score id md5 order date age user fav pool
    parent child source mpixels ratio favcount tagcount gentags arttags chartags copytags
    metatags pixiv_id pixiv approver commenter comm noter noteupdater artcomm
    commentaryupdater upvote downvote ordfav ordpool favgroup ordfavgroup search limit is has
    disapproved flagger appealer comment note embedded duration random updater unaliased
    exif ai commentary newpool random
    """.split()
)

RATING_LETTERS = ("g", "s", "q", "e")
_RATING_WORDS = {
    "g": "g", "general": "g",
    "s": "s", "sensitive": "s", "safe": "s",  # Danbooru maps rating:safe to s, not g
    "q": "q", "questionable": "q",
    "e": "e", "explicit": "e",
}
_EXT_ALIASES = {"jpeg": "jpg", "jpe": "jpg"}


def split_tags(tags: str | Sequence[str]) -> list[str]:
    """Tokens of a query, whitespace-separated, first occurrence kept."""
    raw = tags.split() if isinstance(tags, str) else [t for item in tags for t in str(item).split()]
    out: list[str] = []
    for tok in raw:
        if tok not in out:
            out.append(tok)
    return out


def is_metatag(token: str) -> bool:
    """True for `name:value` tokens (optionally negated with - or ~) whose name is a metatag."""
    body = token.lstrip("-~")
    name, sep, value = body.partition(":")
    return bool(sep) and bool(value) and name.lower() in METATAGS


def count_user_tags(tags: str | Sequence[str]) -> int:
    """How many tokens count against Danbooru's tag limit (metatags are free)."""
    return sum(1 for t in split_tags(tags) if not is_metatag(t))


def normalize_rating(value: str) -> str:
    """A Danbooru rating letter for a letter or word; `safe` means s (sensitive)."""
    key = str(value).strip().lower()
    if key not in _RATING_WORDS:
        raise BooruQueryError(
            f"ratings: unknown rating {value!r}; use g, s, q, e or general, sensitive, questionable, explicit"
        )
    return _RATING_WORDS[key]


def normalize_ext(value: str) -> str:
    ext = str(value).strip().lower().lstrip(".")
    return _EXT_ALIASES.get(ext, ext)


def check_tag_limit(tags: str | Sequence[str], max_user_tags: int | None) -> None:
    """Raise BooruQueryError when the query spends more tags than the account may."""
    if max_user_tags is None:
        return
    n = count_user_tags(tags)
    if n > max_user_tags:
        plain = [t for t in split_tags(tags) if not is_metatag(t)]
        raise BooruQueryError(f"query has {n} tags ({' '.join(plain)}), more than {max_user_tags}: {TAG_LIMIT_HINT}")


def _positive(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BooruQueryError(f"{name}: expected a positive integer, got {value!r}")
    return value


def build_query(
    tags: str | Sequence[str],
    *,
    ratings: Sequence[str] | None = None,
    min_width: int | None = None,
    min_height: int | None = None,
    filetypes: Sequence[str] | None = ("jpg", "png", "webp"),
    exclude_deleted: bool = True,
    max_user_tags: int | None = 2,
) -> str:
    """The `tags=` string for posts.json: user tags, then the free filtering metatags.

    `max_user_tags` is the account's limit (2 anonymous/Member); pass None when credentials
    are configured and let the server judge. Example:
    `build_query("1girl solo", ratings=["general", "s"], min_width=512, min_height=512)` →
    `1girl solo -status:deleted rating:g,s width:>=512 height:>=512 filetype:jpg,png,webp`.
    """
    if isinstance(ratings, str):
        ratings = ratings.replace(",", " ").split()
    if isinstance(filetypes, str):
        filetypes = filetypes.replace(",", " ").split()
    tokens = split_tags(tags)
    check_tag_limit(tokens, max_user_tags)
    names = {t.lstrip("-~").partition(":")[0].lower() for t in tokens if is_metatag(t)}

    extra: list[str] = []
    if exclude_deleted and "status" not in names:
        extra.append("-status:deleted")
    if ratings:
        letters: list[str] = []
        for r in ratings:
            letter = normalize_rating(r)
            if letter not in letters:
                letters.append(letter)
        letters.sort(key=RATING_LETTERS.index)
        if "rating" in names:
            raise BooruQueryError("ratings: the tags already contain a rating: metatag; give ratings once")
        extra.append("rating:" + ",".join(letters))
    if _positive("min_width", min_width):
        extra.append(f"width:>={min_width}")
    if _positive("min_height", min_height):
        extra.append(f"height:>={min_height}")
    if filetypes:
        exts: list[str] = []
        for f in filetypes:
            ext = normalize_ext(f)
            if not ext.isalnum():
                raise BooruQueryError(f"filetypes: bad file type {f!r}")
            if ext not in exts:
                exts.append(ext)
        if "filetype" not in names:
            extra.append("filetype:" + ",".join(exts))
    return " ".join(tokens + [t for t in extra if t not in tokens])
