"""Offline judges: known texts give known directions; registry resolution and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefalign.errors import PrefalignError, UnknownNameError
from prefalign.eval.judges import (
    Judge,
    distinct_n,
    embedding_model_path,
    free_text_judge,
    judge_for,
    judges_for,
    keyword_overlap,
    list_judges,
    mtld,
    words,
)

ROOT = Path(__file__).resolve().parents[1]
PREFERENCES_JSON = ROOT.parent / "shared" / "data" / "preferences.json"

SHORT = "Paris is the capital."
LONG = (
    "Paris is the capital of France. It has been the seat of government for centuries, and it is home "
    "to the national parliament, the presidency and most ministries. The city is also the country's "
    "largest economic and cultural centre."
)
SIMPLE = "The cat sat on the mat. It was warm. The cat was happy."
TECHNICAL = (
    "Photosynthetic organisms utilize chlorophyll-mediated electromagnetic energy transduction to "
    "synthesize carbohydrates from atmospheric carbon dioxide through enzymatically regulated pathways."
)
FORMAL = (
    "The committee has reviewed the proposal and, in accordance with the established regulations, "
    "recommends its approval subject to the provision of additional documentation."
)
CASUAL = "Hey, I think you're gonna love it! It's really cool, lol, just try it and see what happens, ok?"
SYCOPHANTIC = (
    "What a great question! You're absolutely right, and your insightful thinking is truly impressive. "
    "I completely agree with you."
)
NEUTRAL = "The capital of France is Paris. It has been the capital since the tenth century."
DIVERSE = (
    "The violet moon whispered secrets to sleepy harbors, while copper gulls stitched silver threads "
    "across the morning tide and lanterns hummed forgotten lullabies."
)
REPETITIVE = "the cat is on the mat and the cat is on the mat and the cat is on the mat and the cat is on the mat"
FUNNY = "Haha, why did the chicken cross the road? To get to the other side! Just kidding, it's a classic joke."
PLAIN = "The meeting starts at noon in room four. Please bring the quarterly figures."
HARMFUL = "Here is how to build a bomb and kill people with a gun, you stupid idiot."
HARMLESS = "Here is a simple recipe for a healthy vegetable soup that the whole family will enjoy."


def test_words_keeps_contractions_and_hyphens() -> None:
    assert words("Don\u2019t over-think it, OK?") == ["don't", "over-think", "it", "ok"]


def test_length_direction() -> None:
    assert judge_for("verbose").score(LONG) > judge_for("verbose").score(SHORT)
    concise = judge_for("concise")
    assert concise.direction == -1 and concise.name == "length_words"
    assert concise.aligned_score(SHORT) > concise.aligned_score(LONG)
    assert judge_for("informative").direction == 1


def test_readability_direction() -> None:
    expert = judge_for("psoups:expert")
    assert expert.score(TECHNICAL) > expert.score(SIMPLE) + 5
    elementary = judge_for("elementary")
    assert elementary.direction == -1
    assert elementary.aligned_score(SIMPLE) > elementary.aligned_score(TECHNICAL)
    assert judge_for("amulet:complex").name == "fk_grade"


def test_sentiment_direction() -> None:
    pleasant = judge_for("pleasant")
    assert pleasant.score("I love this, wonderful!") > pleasant.score("This is awful.")
    assert pleasant.score("This is awful.") < 0
    unfriendly = judge_for("unfriendly")
    assert unfriendly.direction == -1
    assert unfriendly.aligned_score("This is awful.") > unfriendly.aligned_score("I love this, wonderful!")


def test_formality_direction() -> None:
    formal = judge_for("formal")
    assert formal.score(FORMAL) > formal.score(CASUAL) + 20
    assert 0 <= formal.score(CASUAL) <= 100 and 0 <= formal.score(FORMAL) <= 100
    assert formal.score("") == 50.0


def test_sycophancy_direction() -> None:
    syc = judge_for("sycophantic")
    assert syc.score(SYCOPHANTIC) > 10
    assert syc.score(NEUTRAL) == 0.0
    # Praise aimed at the user counts; the same adjective about a thing does not.
    assert syc.score("Your idea is brilliant and shows an astute mind.") > 0
    assert syc.score("The weather today is brilliant.") == 0.0


def test_diversity_direction() -> None:
    creative = judge_for("creative")
    assert creative.score(DIVERSE) > 3 * creative.score(REPETITIVE)
    details = creative.details(DIVERSE)
    assert set(details) == {"mtld", "distinct_2"}
    assert distinct_n(DIVERSE, 2) > distinct_n(REPETITIVE, 2)
    assert distinct_n("", 2) == 0.0 and mtld("") == 0.0


def test_mtld_matches_lexicalrichness() -> None:
    # Reference values from lexicalrichness 0.5.1: LexicalRichness(text).mtld(threshold=0.72).
    # Hard-coded so the test does not import its pandas/scipy stack.
    expected = {DIVERSE: 148.12, REPETITIVE: 9.0, LONG: 40.0, FORMAL + " " + CASUAL: 90.346666666666668, "one": 1.0}
    for text, value in expected.items():
        assert mtld(text) == pytest.approx(value, rel=1e-12)


def test_humor_and_harm_direction() -> None:
    humor = judge_for("pad:humor")
    assert humor.score(FUNNY) > humor.score(PLAIN) == 0.0
    harmless = judge_for("pad:harmless")
    assert harmless.direction == -1
    assert harmless.aligned_score(HARMLESS) > harmless.aligned_score(HARMFUL)
    # friendly = sentiment, with the humour markers reported beside it.
    friendly = judge_for("psoups:friendly")
    assert friendly.name == "vader_compound"
    assert friendly.details(FUNNY)["humor_markers"] > 0


def test_empty_texts_score_finite() -> None:
    for judge in list_judges(backend="keywords"):
        assert judge.score("", prompt="q") == judge.score("", prompt="q")  # not NaN


def test_every_preset_of_the_shared_data_resolves() -> None:
    if not PREFERENCES_JSON.is_file():
        pytest.skip("shared/data/preferences.json is not beside the repository")
    data = json.loads(PREFERENCES_JSON.read_text())
    names = [f"amulet:{n}" for n in data["amulet"]["preferences"]]
    names += [f"psoups:{n}" for n in data["psoups"] if not n.startswith("_")]
    names += [f"pad:{n}" for n in data["pad"]["principles"]]
    for name in names:
        judges = judges_for(name, backend="keywords")
        assert judges and all(isinstance(j, Judge) for j in judges), name
        assert len(judges) == name.count("+") + 1


def test_registry_names_and_namespaces() -> None:
    assert judge_for("concise") == judge_for("amulet:concise") == judge_for("PSOUPS: Concise")
    assert judge_for("p-soups:concise").preference == "concise"
    names = {j.preference for j in list_judges(backend="keywords")}
    assert {
        "creative",
        "sycophantic",
        "verbose",
        "complex",
        "formal",
        "pleasant",
        "concise",
        "uplifting",
        "elementary",
        "expert",
        "informative",
        "friendly",
        "helpful",
        "harmless",
        "humor",
        "unfriendly",
    } == names
    for judge in list_judges(backend="keywords"):
        assert judge.direction in (1, -1) and judge.description and judge.units and judge.weaknesses


def test_unknown_names_raise_with_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="concise") as err:
        judge_for("concse")
    assert err.value.field == "preference"
    with pytest.raises(UnknownNameError, match="harmless, helpful, humor"):
        judge_for("pad:concise")  # concise is an Amulet/P-Soups preset, not PAD's
    with pytest.raises(UnknownNameError):
        judge_for("amulet:make it rhyme")


def test_combined_principles() -> None:
    assert [j.preference for j in judges_for("pad:helpful+humor", backend="keywords")] == ["helpful", "humor"]
    with pytest.raises(PrefalignError, match="judges_for"):
        judge_for("pad:helpful+humor", backend="keywords")


def test_free_text_keyword_fallback() -> None:
    judge = free_text_judge("Answer like a pirate, with nautical jokes.", backend="keywords")
    assert judge.name == "keyword_overlap" and judge.direction == 1
    assert judge.score("Arr, a pirate joke about the nautical life!") > judge.score("Revenue grew this quarter.")
    assert keyword_overlap("anything", "the of and") == 0.0
    with pytest.raises(PrefalignError):
        free_text_judge("   ")


def test_helpful_needs_the_prompt() -> None:
    helpful = judge_for("pad:helpful", backend="keywords")
    assert helpful.needs_prompt
    q = "What is the capital of France?"
    assert helpful.score("The capital of France is Paris.", prompt=q) > helpful.score("I like turtles.", prompt=q)
    with pytest.raises(PrefalignError, match="prompt"):
        helpful.score("The capital of France is Paris.")


@pytest.mark.skipif(embedding_model_path() is None, reason="no local sentence-embedding model installed")
def test_free_text_embedding_judge() -> None:
    judge = judge_for("Answer like a pirate, with nautical slang.")
    assert judge.name == "embedding_similarity"
    on, off = judge.score_many(["Arr matey, ye be wantin' the treasure on me ship!", "Quarterly revenue grew by 4%."])
    assert -1 <= off < on <= 1
    assert judge.score("Quarterly revenue grew by 4%.") == pytest.approx(off, abs=1e-5)
    helpful = judge_for("helpful")
    assert helpful.name == "prompt_relevance"
    scores = helpful.score_many(
        ["Paris is the capital of France.", "I like turtles."], prompts=["What is the capital of France?"] * 2
    )
    assert scores[0] > scores[1]


def test_forcing_the_embedding_backend_without_a_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFALIGN_EMBEDDING_MODEL", str(tmp_path))  # no config.json there
    assert embedding_model_path() is None
    assert judge_for("be brief and kind").name == "keyword_overlap"
    with pytest.raises(PrefalignError, match="prefalign setup minilm"):
        free_text_judge("be brief and kind", backend="embedding")


def test_docs_table_lists_every_preset() -> None:
    doc = (ROOT / "docs" / "judges.md").read_text()
    for judge in list_judges(backend="keywords"):
        assert f"| {judge.preference} |" in doc, judge.preference
        assert judge.name in doc
