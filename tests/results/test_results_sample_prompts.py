"""`sample`'s prompts fit what the text encoder reads (77 CLIP tokens), and a longer one is said
in one line instead of being cut silently (issue 24)."""
from __future__ import annotations

import logging

import pytest

from lora.sample import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPTS, SampleRequest, generate_samples, long_prompts


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's real CLIP tokenizer: a small vocabulary, so it needs more tokens for a
    text than SD1.5's; what fits here fits there."""
    from lora.model import load_pipeline

    return load_pipeline("tiny").tokenizer


def test_the_defaults_fit_77_clip_tokens(tokenizer):
    assert tokenizer.model_max_length == 77
    for text in (DEFAULT_NEGATIVE_PROMPT, *(f"mytrigger, {p}" for p in DEFAULT_PROMPTS)):
        assert len(tokenizer(text, truncation=False, verbose=False).input_ids) <= 77, text
    assert long_prompts(tokenizer, [f"mytrigger, {p}" for p in DEFAULT_PROMPTS], DEFAULT_NEGATIVE_PROMPT) == []


def test_a_long_prompt_is_one_clear_warning(lora_runs, tmp_path, caplog):
    long_prompt = "1girl, " + ", ".join(f"tag{i}" for i in range(60)) + ", finaltag"
    with caplog.at_level(logging.WARNING):
        generate_samples("tiny", [lora_runs[0]], tmp_path / "samples",
                         SampleRequest(prompts=[long_prompt], seeds=(0,), steps=1), device="cpu")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    mine = [m for m in warned if m.startswith("prompt 1 is ")]
    assert len(mine) == 1 and "over the 77 the text encoder reads" in mine[0]
    assert "finaltag" in mine[0] and "\n" not in mine[0]
    assert not [m for m in warned if "truncated because CLIP" in m]  # not diffusers' as well
