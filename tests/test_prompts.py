"""Templates, presets and chat handling."""

from __future__ import annotations

import json

import pytest

from prefalign.errors import PrefalignError, TemplateError, UnknownNameError
from prefalign.prompts import (
    AMULET_PREFERENCES,
    AMULET_SYSTEM_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    PAD_GUIDELINE_TEMPLATE,
    PAD_PRINCIPLES,
    PSOUPS_PREFERENCES,
    chat_to_text,
    encode_context,
    parse_preferences,
    render_chat,
    to_chat,
)


def test_presets_reproduce_the_papers_texts(shared_data):
    data = json.loads((shared_data / "preferences.json").read_text())
    assert AMULET_SYSTEM_TEMPLATE == data["amulet"]["system_template"]
    assert AMULET_PREFERENCES == data["amulet"]["preferences"]
    assert PAD_GUIDELINE_TEMPLATE == data["pad"]["guideline_template"]
    assert PAD_PRINCIPLES == data["pad"]["principles"]
    assert PSOUPS_PREFERENCES == {k: v for k, v in data["psoups"].items()}


def test_preset_resolution_and_namespaces():
    assert parse_preferences("concise")[0].text == AMULET_PREFERENCES["concise"]
    assert parse_preferences("psoups:concise")[0].text == PSOUPS_PREFERENCES["concise"]
    assert parse_preferences("expert")[0].text == PSOUPS_PREFERENCES["expert"]
    assert parse_preferences("pad:humor")[0].text == "humor"
    free = parse_preferences("Answer like a pirate would.")[0]
    assert (free.text, free.name) == ("Answer like a pirate would.", None)


def test_weighted_lists():
    prefs = parse_preferences([("concise", 2), {"text": "Use British spelling, please.", "weight": 0.5}])
    assert [p.weight for p in prefs] == [2.0, 0.5]
    assert prefs[1].text == "Use British spelling, please."


@pytest.mark.parametrize("bad", ["concize", "   ", [], [{"weight": 1}], 3])
def test_bad_preferences(bad):
    with pytest.raises(PrefalignError) as info:
        parse_preferences(bad)
    assert info.value.field == "preference"


def test_unknown_preset_lists_known():
    with pytest.raises(UnknownNameError, match="amulet:concise"):
        parse_preferences("amulet:nope")


def test_default_template_puts_preference_after_system_prompt():
    chat = to_chat("Hi")
    base = render_chat(chat, None, "default")
    pref = render_chat(chat, "Be brief.", "default")
    assert base[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert pref[0]["content"] == f"{DEFAULT_SYSTEM_PROMPT} Be brief."
    own = to_chat([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}])
    assert render_chat(own, "Be brief.", "default")[0]["content"] == "You are a pirate. Be brief."
    assert render_chat(own, None, "default")[0]["content"] == "You are a pirate."


def test_amulet_template_is_the_papers_string():
    chat = to_chat("Hi")
    pref = render_chat(chat, AMULET_PREFERENCES["formal"], "amulet")
    base = render_chat(chat, None, "amulet")
    assert pref[0]["content"] == AMULET_SYSTEM_TEMPLATE.format(preference=AMULET_PREFERENCES["formal"])
    assert base[0]["content"] == AMULET_SYSTEM_TEMPLATE.format(preference="")
    assert base[0]["content"].endswith("advice. ")


def test_pad_template_wraps_last_user_message():
    chat = to_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    out = render_chat(chat, "humor", "pad")
    assert out[0]["content"] == "a"
    assert out[2]["content"] == PAD_GUIDELINE_TEMPLATE.format(principles="humor", instruction="c")
    assert render_chat(chat, None, "pad") == chat


def test_chat_template_with_generation_prompt(tokenizer):
    text = chat_to_text(tokenizer, render_chat(to_chat("Hi"), None, "amulet"), "amulet")
    assert text.endswith("<|im_start|>assistant\n")
    assert encode_context(tokenizer, to_chat("Hi"), None, "default") == tokenizer(
        chat_to_text(tokenizer, render_chat(to_chat("Hi"), None, "default"), "default")
    )["input_ids"]


def test_missing_chat_template_is_a_clear_error(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(TemplateError, match="template='plain'"):
        encode_context(plain, to_chat("Hi"), None, "default")
    ids = encode_context(plain, to_chat("Hi"), "Be brief.", "plain")
    assert plain.decode(ids).endswith("User: Hi\nAssistant:")


@pytest.mark.parametrize("bad", ["", "   ", [], [{"role": "robot", "content": "x"}], [{"role": "system", "content": "x"}], [{"content": "x"}]])
def test_bad_prompts(bad):
    with pytest.raises(TemplateError):
        to_chat(bad)


def test_unknown_template():
    with pytest.raises(UnknownNameError, match="default"):
        render_chat(to_chat("Hi"), None, "fancy")
