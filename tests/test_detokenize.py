"""Incremental detokenisation gives, at every token, the text a whole decode gives."""

from __future__ import annotations

import random

import pytest

from prefalign.decoding.detokenize import IncrementalText
from prefalign.decoding.stopping import REPLACEMENT, StopStrings

MULTIBYTE = "naïve café — 東京タワー 🤖🎉 Ωμέγα ½ ∑x² “quotes” ﬁ \u200d👩‍💻"


def _byte_tokens(tokenizer) -> list[int]:
    """Tokens whose bytes are not valid UTF-8 on their own (parts of multibyte characters)."""
    found = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if REPLACEMENT in text:
            found.append(token_id)
    return found


@pytest.fixture(scope="module")
def byte_tokens(tokenizer) -> list[int]:
    tokens = _byte_tokens(tokenizer)
    assert len(tokens) > 50  # the byte-level vocabulary has them; the test below needs them
    return tokens


def _check(tokenizer, tokens: list[int]) -> None:
    incremental = IncrementalText(tokenizer)
    for n in range(1, len(tokens) + 1):
        whole = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        assert incremental.update(tokens[:n]) == whole, (tokens[:n], whole)
        assert incremental.text == whole


def test_random_sequences_equal_whole_decode(tokenizer, byte_tokens):
    rng = random.Random(0)
    vocab = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    for _ in range(300):
        length = rng.randint(1, 40)
        pool = rng.choice(["any", "bytes", "mixed"])
        tokens = []
        for _ in range(length):
            r = rng.random()
            if pool == "bytes" or (pool == "mixed" and r < 0.5):
                tokens.append(rng.choice(byte_tokens))
            elif r < 0.6 and specials:
                tokens.append(rng.choice(specials))
            else:
                tokens.append(rng.randrange(vocab))
        _check(tokenizer, tokens)


def test_multibyte_text_equals_whole_decode(tokenizer):
    ids = tokenizer(MULTIBYTE * 3, add_special_tokens=False)["input_ids"]
    # Tokens split characters: some prefixes end mid-character.
    assert any(tokenizer.decode(ids[:n]).endswith(REPLACEMENT) for n in range(1, len(ids)))
    _check(tokenizer, ids)
    incremental = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        incremental.update(ids[:n])
    assert incremental.text == MULTIBYTE * 3


def test_streamed_text_holds_back_incomplete_characters(tokenizer):
    """The engine streams ``text[emitted:safe_end]``: what streams is the same as with whole decodes."""
    ids = tokenizer("ab 🤖 cd 東京 e", add_special_tokens=False)["input_ids"]
    stops = StopStrings(())
    incremental, streamed, emitted = IncrementalText(tokenizer), [], 0
    for n in range(1, len(ids) + 1):
        text = incremental.update(ids[:n])
        safe = stops.safe_end(text, emitted)
        streamed.append(text[emitted:safe])
        emitted = safe
        assert REPLACEMENT not in streamed[-1]
    assert "".join(streamed) == "ab 🤖 cd 東京 e"


def test_a_tokenizer_whose_windows_disagree_falls_back_to_whole_decodes():
    class Odd:
        """Decodes a list to its length's digits: no window lines up with the whole."""

        def decode(self, tokens, skip_special_tokens=True):
            return "x" * (len(tokens) % 3) + str(len(tokens))

    incremental = IncrementalText(Odd())
    for n in range(1, 12):
        assert incremental.update(list(range(n))) == Odd().decode(list(range(n)))
