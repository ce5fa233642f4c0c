"""Incremental detokenization: multi-byte characters split across tokens never leak U+FFFD, and
the pieces always add up to decoding the whole output at once."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from miniyaie.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! Plain ASCII with  double spaces and\nnewlines.",
    "猫は好き？ 是的，我喜欢猫！ 한국어도 됩니다.",
    "Emoji: 🐈‍⬛👍🏽🇫🇷 family 👨‍👩‍👧‍👦 and 🌍🌎🌏.",
    "Mixed: café naïve — “quotes” ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok",
    " leading space, trailing space ",
]


def pieces(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    out = [detok.add(t) for t in output_ids]
    assert "".join(out) == detok.text
    return out


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "User: say something.\nAssistant:", "中文提示"])
def test_incremental_matches_whole_decode(tokenizer, text, prompt):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = pieces(tokenizer, prompt_ids, ids)
    assert all("\ufffd" not in p for p in out), out
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(out) == text


def test_multibyte_characters_split_across_tokens(tokenizer):
    """Byte-level BPE splits rare characters into byte tokens; each alone decodes to U+FFFD."""
    text = "𝔘🐈‍⬛"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "expected byte-fallback tokens"
    out = pieces(tokenizer, [], ids)
    assert "".join(out) == text
    assert "" in out  # text was held back until its character completed


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False) + [tokenizer.eos_token_id]
    out = pieces(tokenizer, [], ids)
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True)


_CHARS = st.sampled_from(list("abc xyz.,!\n") + list("猫犬日本語中文한국") + ["🐈", "👍🏽", "🇫🇷", "𝔘", "é", "—"])


@settings(max_examples=60, deadline=None)
@given(st.lists(_CHARS, min_size=1, max_size=30).map("".join), st.integers(0, 3))
def test_random_unicode_text(tokenizer, text, prompt_len):
    prompt_ids = tokenizer.encode("Prompt 提示 🙂", add_special_tokens=False)[:prompt_len]
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = pieces(tokenizer, prompt_ids, ids)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(out) == whole
    assert all("\ufffd" not in p for p in out)
