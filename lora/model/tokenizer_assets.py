"""A real CLIP-style byte-level BPE tokenizer, generated offline and deterministically.

Why: the tiny model must exercise the same tokenizer code path as SD1.5 (``CLIPTokenizer``
reading ``vocab.json`` + ``merges.txt``, BOS/EOS, padding to 77) without downloading
OpenAI's 49k-token vocabulary. We learn a few hundred BPE merges from a small built-in
corpus of anime tags so that common tags become few tokens, exactly as CLIP's
vocabulary does for English words.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
DEFAULT_NUM_MERGES = 400

# Anime/Danbooru tags with rough weights (how often they appear in captions). The weights
# only steer which merges are learned first; any text still tokenizes (byte fallback).
TAG_CORPUS: dict[str, int] = {
    "1girl": 50, "1boy": 20, "2girls": 10, "multiple girls": 8, "solo": 45, "looking at viewer": 30,
    "smile": 35, "open mouth": 25, "closed mouth": 12, "blush": 30, "long hair": 40,
    "short hair": 30, "very long hair": 12, "twintails": 15, "ponytail": 12, "braid": 8,
    "bangs": 25, "blunt bangs": 8, "hair ornament": 15, "hair between eyes": 12, "ahoge": 8,
    "black hair": 15, "blonde hair": 15, "brown hair": 15, "blue hair": 12, "pink hair": 10,
    "white hair": 12, "silver hair": 8, "red hair": 10, "green hair": 6, "purple hair": 8,
    "aqua hair": 8, "blue eyes": 20, "red eyes": 15, "green eyes": 10, "brown eyes": 12,
    "purple eyes": 8, "yellow eyes": 6, "aqua eyes": 8, "school uniform": 20, "serafuku": 10,
    "skirt": 25, "pleated skirt": 12, "shirt": 20, "white shirt": 12, "dress": 18,
    "thighhighs": 15, "gloves": 10, "long sleeves": 15, "jacket": 10, "ribbon": 12,
    "hair ribbon": 8, "bow": 12, "necktie": 10, "detached sleeves": 8, "hat": 10,
    "holding": 12, "standing": 12, "sitting": 10, "upper body": 15, "full body": 10,
    "cowboy shot": 8, "simple background": 20, "white background": 20, "outdoors": 10,
    "indoors": 8, "sky": 10, "day": 8, "night": 6, "cloud": 6, "flower": 10, "cherry blossoms": 6,
    "hatsune miku": 15, "vocaloid": 12, "kagamine rin": 5, "megurine luka": 5,
    "hakurei reimu": 6, "kirisame marisa": 6, "touhou": 8, "watercolor": 10,
    "watercolor (medium)": 6, "traditional media": 6, "sketch": 6, "monochrome": 6,
    "masterpiece": 15, "best quality": 15, "high quality": 8, "absurdres": 4, "highres": 4,
    "anime coloring": 6, "official art": 6, "portrait": 8, "profile": 5, "from side": 6,
    "from behind": 5, "hand up": 6, "v": 5, "heart": 6, "star (symbol)": 4, "jewelry": 8,
    "earrings": 8, "animal ears": 10, "cat ears": 8, "tail": 8, "wings": 6, "breasts": 10,
    "medium breasts": 6, "collarbone": 8, "bare shoulders": 8, "sleeveless": 6,
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# CLIP's pre-tokenization: letters runs, single digits, punctuation runs (ASCII corpus only).
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def _corpus_words(corpus: dict[str, int]) -> Counter[tuple[str, ...]]:
    byte_map = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for tag, weight in corpus.items():
        for word in _WORD_RE.findall(tag.lower()):
            symbols = [byte_map[b] for b in word.encode("utf-8")]
            symbols[-1] = symbols[-1] + "</w>"
            words[tuple(symbols)] += weight
    return words


def learn_merges(corpus: dict[str, int] = TAG_CORPUS, num_merges: int = DEFAULT_NUM_MERGES) -> list[tuple[str, str]]:
    """Classic BPE training; ties broken lexicographically so the result is deterministic."""
    words = _corpus_words(corpus)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes+</w>, merges in order, then BOS and EOS."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    seen = set(tokens)
    for a, b in merges:
        token = a + b
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: Path, num_merges: int = DEFAULT_NUM_MERGES) -> dict[str, int]:
    """Write vocab.json, merges.txt and the config files CLIPTokenizer.from_pretrained reads.

    Returns the vocabulary (the text encoder needs its size and the BOS/EOS ids).
    """
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(TAG_CORPUS, num_merges)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return vocab
