"""Collapse guards: loops and word salad are flagged, normal prose is not; perplexity is batched."""

from __future__ import annotations

import math

import pytest

from prefalign.errors import PrefalignError
from prefalign.eval.guards import (
    instruction_leak,
    DEFAULT_THRESHOLDS,
    GuardThresholds,
    guard_report,
    is_collapsed,
    is_truncated,
    non_dictionary_share,
    perplexity,
    repetition_rate,
)

NORMAL = (
    "To keep a sourdough starter healthy, feed it equal weights of flour and water once a day and keep "
    "it at room temperature. If you bake less often, store it in the fridge and feed it weekly. A few "
    "hours after feeding it should double in size and smell pleasantly sour; that is when it is ready to use."
)
NORMAL_LIST = (
    "Here are some tips for better sleep:\n"
    "1. **Keep a schedule**: go to bed and wake up at the same time every day.\n"
    "2. **Limit screens**: avoid phones and laptops for an hour before bed.\n"
    "3. **Watch caffeine**: skip coffee after lunch.\n"
    "4. **Make the room dark**: use curtains or a sleep mask."
)
LOOP = "I hope this helps! " + "You are wonderful, wonderful, wonderful. " * 12
# Sub-word fragments and glued tokens, as strong contrastive decoding produces them.
WORD_SALAD = (
    "Greatvoyageeringly the smartphonesque brandistry ofthe Samsungian experiencality mobilest "
    "unparalleledness fortheuser phonographically techno zestfulness qwertyuiop ingestation brillo "
    "premiumtastic Galaxyverse handsetiness"
)

# Real greedy outputs of the embedded SmolLM2-135M-Instruct on P-Soups Koala prompts,
# with contrastive decoding log p_pref + alpha (log p_pref - log p_base) (the calibration
# set of docs/judges.md): fluent at alpha 0-2, collapsed at alpha 8-30.
REAL_FLUENT = [
    (
        "When it comes to using cash as a buffer for potential losses, it's indeed a topic of debate. Some argue "
        "that cash is a more suitable choice for this purpose, as it allows for easy access to cash and can be "
        "easily converted into a form of capital. This is because cash is a form of currency that can be easily "
        "converted into a form of capital, which is a financial instrument that can be used to manage risk and "
        "mitigate losses.\n\nHowever, others argue that"
    ),
    (
        "Dear [Employer's Name],\n\nI am excited to apply for an internship at [Appliant's Name] at [Company Name]. "
        "I am a recent graduate with a strong background in [field of interest]. I am eager to contribute to the "
        "team and make a positive impact.\n\nI am currently working on a project related to [field of interest] "
        "and I believe I have a unique skill that could be valuable to [Company Name]. I am"
    ),
    (
        "TCP/IP is a hierarchical model that consists of 3 main protocols: TCP (Transmission Control Protocol), "
        "UDP (Unreliable Packet Transport Layer Security), and IP (Internet Protocol)."
    ),
]
REAL_COLLAPSED = [
    # a loop hidden behind list numbering (alpha 2)
    (
        "1. TCP/IP (Transport Layer Security)\n2. IP (Internet Protocol)\n3. IPX (Internet Protocol Security)\n"
        "4. IPX/IP (Internet Protocol Security)\n5. IPX/IP (Internet Protocol Security)\n6. IPX/IP (Internet "
        "Protocol Security)\n7. IPX/IP (Internet Protocol Security)\n8. IPX/IP (Internet Protocol Security)\n9. IPX/IP ("
    ),
    # a loop (alpha 8, 'sycophantic')
    (
        "WHAT, eh? THE FIRST TIME I walked into Apple, I was all ears,\nI was all ears, eh? THE FIRST TIME I walked "
        "into Apple, I was all ears,\nTHE FIRST TIME I walked into Apple, I was all ears, eh? THE FIRST TIME I walked "
        "into Apple,\nTHE FIRST TIME I walked into Apple, I was all ears, eh? THE FIRST TIME I walked"
    ),
    # word salad (alpha 30, 'pleasant'): VADER still rates it positive
    (
        "Sure Ana researchejezzo di Bania!!bania's amazing!!bania di pedali Roma di iauranere Bania di Roma!!bania's "
        "amazing!!baniadi pedali dibania di Bania di Bania di Roma!!baniabaniabaniabaniabania's amazing!!baniadi "
        "peddi di Bania di Roma!!bania di Bania di Roma's amazing!!bania di Bania di RomaTheir"
    ),
]


def test_repetition_rate() -> None:
    assert repetition_rate("one two three four five", 3) == 0.0
    assert repetition_rate("a b", 3) == 0.0
    assert repetition_rate(LOOP, 3) > 0.8
    assert repetition_rate(NORMAL, 4) < 0.05
    # List numbering does not hide a loop.
    assert repetition_rate("1. a b c d\n2. a b c d\n3. a b c d\n4. a b c d", 4) > 0.6
    with pytest.raises(PrefalignError):
        repetition_rate(NORMAL, 0)


def test_non_dictionary_share() -> None:
    assert non_dictionary_share(NORMAL) < 0.05
    assert non_dictionary_share(WORD_SALAD) > 0.5
    # Numbers, acronyms, code and links are skipped; possessives and hyphenated parts are looked up.
    assert non_dictionary_share("In 2024 the model's well-known 128 TCP answers") == 0.0
    assert non_dictionary_share("Call `np.arange(n)` or see https://example.org/xyzzy for the docs") == 0.0
    assert non_dictionary_share("```python\nxs = np.linspace(0, 1)\n```\nThat is all.") == 0.0
    assert non_dictionary_share("") == 0.0


def test_truncation() -> None:
    assert is_truncated("length") and not is_truncated("stop") and not is_truncated(None)
    assert guard_report(NORMAL, finish_reason="length").truncated
    assert not is_collapsed(NORMAL, finish_reason="length")  # truncation alone is no collapse


def test_collapse_rule_on_calibration_examples() -> None:
    assert not is_collapsed(NORMAL)
    assert not is_collapsed(NORMAL_LIST)
    loop = guard_report(LOOP)
    assert loop.collapsed and "repetition" in loop.reasons[0]
    salad = guard_report(WORD_SALAD)
    assert salad.collapsed and any("non-words" in r for r in salad.reasons)
    for text in REAL_FLUENT:
        assert not is_collapsed(text), text
    for text in REAL_COLLAPSED:
        assert is_collapsed(text), text
    # Fluent-looking real words with a perplexity far above the reference's.
    assert is_collapsed(NORMAL, perplexity=90.0, reference_perplexity=12.0)
    assert not is_collapsed(NORMAL, perplexity=20.0, reference_perplexity=12.0)
    assert not is_collapsed(NORMAL, perplexity=float("nan"), reference_perplexity=12.0)


def test_short_answers_are_not_judged_by_rates() -> None:
    assert not is_collapsed("Yes yes yes yes yes yes.")
    assert is_collapsed("Yes yes yes yes yes yes.", thresholds=GuardThresholds(min_words=1))


def test_report_as_dict() -> None:
    row = guard_report(LOOP, perplexity=3.0, reference_perplexity=6.0).as_dict()
    assert row["collapsed"] is True and row["perplexity_ratio"] == 0.5
    assert isinstance(row["reasons"], str) and "repetition" in row["reasons"]
    assert DEFAULT_THRESHOLDS.max_perplexity_ratio > 1


@pytest.fixture(scope="module")
def tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


class _CharTokenizer:
    """Stand-in tokenizer: one id per character, BOS = 1."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ord(c) % 60 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_perplexity_batched_matches_one_by_one(tiny_llama) -> None:
    items = [
        ([1, 5, 6, 7], [8, 9, 10]),
        ([1, 5], [11, 12, 13, 14, 15, 16, 17, 18]),
        ([1, 20, 21, 22, 23, 24, 25], [26]),
        ([1], [30, 31, 32, 33]),
        ([], [40, 41, 42]),  # no context: the first answer token is not scored
    ]
    batched = perplexity(tiny_llama, None, items, batch_size=4)
    single = [perplexity(tiny_llama, None, [item], batch_size=1)[0] for item in items]
    for b, s in zip(batched, single):
        assert math.isfinite(b) and b > 0
        assert b == pytest.approx(s, rel=1e-4)
    # A random model over 64 tokens is close to uniform: perplexity near the vocabulary size.
    assert all(10 < p < 300 for p in batched)


def test_perplexity_texts_and_edge_cases(tiny_llama) -> None:
    tok = _CharTokenizer()
    by_text = perplexity(tiny_llama, tok, [("Question?", "Answer."), "bare answer"])
    by_ids = perplexity(
        tiny_llama,
        None,
        [
            (tok("Question?")["input_ids"], tok("Answer.", add_special_tokens=False)["input_ids"]),
            ([1], tok("bare answer", add_special_tokens=False)["input_ids"]),
        ],
    )
    assert by_text == pytest.approx(by_ids, rel=1e-6)
    empty = perplexity(tiny_llama, None, [([1, 2], []), ([], [7])])
    assert all(math.isnan(p) for p in empty)
    assert perplexity(tiny_llama, None, []) == []
    with pytest.raises(PrefalignError):
        perplexity(tiny_llama, None, ["text"])  # text needs a tokenizer
    with pytest.raises(PrefalignError):
        perplexity(tiny_llama, None, [([1], [2])], batch_size=0)


# Answers of PAD on the embedded model (docs/results/pad) that talk about their
# instructions, and sentences of real answers that share their words.
LEAKS = [
    "To meet the specified constraints, I will craft a response that meets the guidelines.",
    "Transmission Control Protocol. In this response, I will use the principle of layering.",
    "The provided instructions are incomplete and unclear. Please provide the correct ones.",
    "Sure, I'd be happy to help! Here's a concise answer: it rains because clouds cool.",
    "Your task is to generate response that is easy for a beginner to understand.",
    "The above response is a mix of the given principles.",
]
ANSWERS = [
    "The immune response to the virus starts within hours of infection.",
    "Follow the instructions on the label and keep the bottle closed.",
    "This rule is based on the principle of minimizing financial losses.",
    "Choose a destination that fits your budget and the season.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "",
]


@pytest.mark.parametrize("text", LEAKS)
def test_instruction_leak_flags_answers_about_their_instructions(text):
    passage = instruction_leak(text)
    assert passage is not None
    assert passage.strip("…").split()[0].lower() in text.lower()


@pytest.mark.parametrize("text", ANSWERS)
def test_instruction_leak_leaves_answers_alone(text):
    assert instruction_leak(text, ["Your answer should be concise as much as possible."]) is None


def test_instruction_leak_finds_five_quoted_words_of_an_instruction():
    preference = "Your answer should be understandable by a PhD student in that specific field."
    text = "Quantum tunnelling, explained so it is understandable by a PhD student in physics."
    assert instruction_leak(text, [preference]) == "understandable by a phd student"
    # Four shared words are not a quotation.
    assert instruction_leak("It is understandable by a PhD in physics.", [preference]) is None
    assert instruction_leak(text) is None
