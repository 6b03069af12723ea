"""Chat formatting: a prompt plus preferences → the token contexts a method compares.

A *context* is one rendering of the same conversation. The **base** context is the
chat without any preference; a **preference** context carries one preference text.
How the preference enters the chat is decided by a *template*:

``default``
    The preference is appended to the system message (after the user's own system
    prompt, if any). With no system prompt a neutral one is used in both contexts, so
    that the only difference between base and preference contexts is the preference.
``amulet``
    The Amulet paper's system template, ``SYSTEM_PROMPT.format(preference=...)``; the
    base context is the same template formatted with an empty preference.
``pad``
    The PAD paper's guideline template wrapped around the last user message; the base
    context is the plain user message.
``plain``
    No chat template: ``System: ...`` / ``User: ...`` / ``Assistant:`` lines, for
    tokenizers without a chat template.

Preset preference names reproduce the papers' sentences (see :data:`PRESETS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .errors import PrefalignError, TemplateError, UnknownNameError

# --- The papers' texts -------------------------------------------------------------
# Amulet (zowiezhang/Amulet, prompts.py, MIT).
AMULET_SYSTEM_TEMPLATE = (
    "You are an AI designed to provide the most helpful, clear, and concise responses. "
    "Focus on giving actionable information, ensuring accuracy and detail without "
    "overwhelming the user. You should also be patient, polite, and calm. Avoid "
    "unnecessary complexity and always prioritize practical, user-friendly advice. "
    "{preference}"
)
AMULET_PREFERENCES: dict[str, str] = {
    name: f"Your answer should be {name} as much as possible."
    for name in (
        "creative",
        "sycophantic",
        "verbose",
        "complex",
        "formal",
        "pleasant",
        "concise",
        "uplifting",
    )
}
# PAD (zjuruizhechen/PAD): guideline template and principles.
PAD_GUIDELINE_TEMPLATE = (
    "[Guidelines] Your task is to generate response by considering the following "
    "principle. [Principles] {principles} [Instruction] {instruction}"
)
PAD_PRINCIPLES: dict[str, str] = {
    "helpful": "helpfulness",
    "harmless": "harmless",
    "humor": "humor",
    "helpful+harmless": "harmless and helpfulness",
    "helpful+humor": "helpfulness and humor",
    "harmless+humor": "harmless and humor",
    "helpful+harmless+humor": "harmless and helpfulness and humor",
}
# P-Soups criteria (RLPHF, criteria_wise_eval_gpt4).
PSOUPS_PREFERENCES: dict[str, str] = {
    "elementary": "Choose a response that can easily be understandable by an elementary school student.",
    "expert": "Choose a response that can only be understandable by a PhD student in that specific field.",
    "concise": "Choose a response that is concise and to the point, without being verbose.",
    "informative": "Choose a response that is very informative without missing any background information.",
    "friendly": "Choose a response that is friendly, witty, funny and humorous, like a close friend.",
}

#: Every preset as ``"family:name" -> text``. Bare names resolve in the order
#: amulet, psoups, pad (so ``"concise"`` is Amulet's sentence, ``"psoups:concise"``
#: P-Soups').
PRESETS: dict[str, str] = {
    **{f"amulet:{k}": v for k, v in AMULET_PREFERENCES.items()},
    **{f"psoups:{k}": v for k, v in PSOUPS_PREFERENCES.items()},
    **{f"pad:{k}": v for k, v in PAD_PRINCIPLES.items()},
}
PRESET_FAMILIES = ("amulet", "psoups", "pad")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TEMPLATES = ("default", "amulet", "pad", "plain")

Message = Mapping[str, str]
Chat = list[dict[str, str]]
PromptLike = Union[str, Sequence[Message]]


@dataclass(frozen=True)
class Preference:
    """One preference: its text, a weight for composition and the preset it came from."""

    text: str
    weight: float = 1.0
    name: str | None = None


def resolve_preset(name: str) -> str | None:
    """Return the preset text for ``name`` (``"concise"``, ``"psoups:concise"``), or None."""
    key = name.strip()
    if key in PRESETS:
        return PRESETS[key]
    for family in PRESET_FAMILIES:
        if f"{family}:{key}" in PRESETS:
            return PRESETS[f"{family}:{key}"]
    return None


def _looks_like_preset(text: str) -> bool:
    # A single token such as "concize" or "amulet:foo" is meant as a preset name.
    return " " not in text.strip() and (len(text.strip()) <= 24 or ":" in text)


def parse_preferences(preference: Any) -> list[Preference]:
    """Normalise the ``preference`` argument into a list of :class:`Preference`.

    Accepts None, a preset name, free text, a :class:`Preference`, a ``(text, weight)``
    pair, a ``{"text": ..., "weight": ...}`` dict, or a list of any of these.
    A single word that is not a preset is rejected as a likely typo; write a sentence
    to use free text.
    """
    if preference is None:
        return []
    if isinstance(preference, (str, Preference, Mapping)) or (
        isinstance(preference, tuple) and len(preference) == 2 and isinstance(preference[1], (int, float))
    ):
        items = [preference]
    elif isinstance(preference, Sequence):
        items = list(preference)
    else:
        raise PrefalignError(
            f"preference must be a string, a preset name or a list of (text, weight); got {type(preference).__name__}",
            field="preference",
        )
    out = [_parse_one(item) for item in items]
    if not out:
        raise PrefalignError("preference list is empty; pass None for no preference", field="preference")
    # Any finite positive weights are fine, however far apart: the request scales them
    # (engine.normalise_weights), so that no sum of them overflows.
    return out


def _parse_one(item: Any) -> Preference:
    weight = 1.0
    if isinstance(item, Preference):
        text, weight, name = item.text, item.weight, item.name
    else:
        if isinstance(item, Mapping):
            if "text" not in item:
                raise PrefalignError("each preference object needs a 'text' field", field="preference")
            text, weight = item["text"], item.get("weight", 1.0)
        elif isinstance(item, tuple) and len(item) == 2:
            text, weight = item
        elif isinstance(item, str):
            text = item
        else:
            raise PrefalignError(f"cannot read preference {item!r}", field="preference")
        if not isinstance(text, str):
            raise PrefalignError("preference text must be a string", field="preference")
        name = None
        preset = resolve_preset(text)
        if preset is not None:
            name, text = text.strip(), preset
        elif _looks_like_preset(text) and text.strip():
            from .suggest import did_you_mean

            names = [k.split(":", 1)[1] for k in PRESETS] + list(PRESETS)
            raise UnknownNameError(
                f"unknown preference preset {text.strip()!r}{did_you_mean(text, names)}; known presets: "
                f"{', '.join(sorted(PRESETS))}. Write a sentence to use free text.",
                field="preference",
            )
    if not text.strip():
        raise PrefalignError("preference text is empty; give a sentence or a preset name", field="preference")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
        raise PrefalignError(f"preference weight must be a finite number > 0, got {weight!r}", field="preference")
    check_text(text, "preference")
    return Preference(text=text.strip(), weight=float(weight), name=name)


def check_text(text: str, field: str) -> None:
    """Reject text that cannot be encoded as UTF-8 (e.g. a lone surrogate), naming ``field``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TemplateError(
            f"{field} contains a character that is not valid Unicode text ({exc.reason} at position {exc.start}); "
            "remove it or send proper UTF-8",
            field=field,
        ) from None


def to_chat(prompt: PromptLike) -> Chat:
    """A prompt string becomes a one-message chat; a chat is checked and copied."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise TemplateError("the prompt is empty; give some text to answer", field="prompt")
        check_text(prompt, "prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or not prompt:
        raise TemplateError("a chat must be a non-empty list of {role, content} messages", field="messages")
    chat: Chat = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TemplateError(f"message {i} needs 'role' and 'content'", field="messages")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise TemplateError(
                f"message {i} has role {role!r}; use system, user or assistant", field="messages"
            )
        if not isinstance(content, str):
            raise TemplateError(f"message {i} content must be a string", field="messages")
        check_text(content, f"messages.{i}.content")
        chat.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in chat):
        raise TemplateError("the chat has no non-empty user message", field="messages")
    return chat


def check_template(template: Any) -> str:
    """``template`` if it is one of :data:`TEMPLATES`, else an error naming them (every face's check)."""
    if template not in TEMPLATES:
        from .suggest import did_you_mean

        raise UnknownNameError(
            f"unknown template {template!r}{did_you_mean(str(template), TEMPLATES)}; choose one of {', '.join(TEMPLATES)} "
            "(CLI: --template NAME)",
            field="template",
        )
    return template


def render_chat(chat: Chat, preference: str | None, template: str) -> Chat:
    """Return the chat as the model should see it under ``template``.

    ``preference`` None gives the base context.
    """
    check_template(template)
    system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
    turns = [m for m in chat if m["role"] != "system"]
    if template in ("default", "plain"):
        system = system or DEFAULT_SYSTEM_PROMPT
        if preference:
            system = f"{system} {preference}"
        return [{"role": "system", "content": system}, *turns]
    if template == "amulet":
        # Exactly the paper's string; the base context keeps the trailing space that
        # str.format with an empty preference leaves.
        text = AMULET_SYSTEM_TEMPLATE.format(preference=preference or "")
        if system:
            text = f"{system}\n\n{text}"
        return [{"role": "system", "content": text}, *turns]
    # pad: guideline template around the last user message.
    out = [dict(m) for m in chat]
    if preference:
        last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
        out[last_user]["content"] = PAD_GUIDELINE_TEMPLATE.format(
            principles=preference, instruction=out[last_user]["content"]
        )
    return out


def chat_to_text(tokenizer: Any, chat: Chat, template: str) -> str:
    """Apply the tokenizer's chat template (or the plain one) with a generation prompt."""
    if template == "plain":
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in chat]
        return "\n".join(lines) + "\nAssistant:"
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this tokenizer has no chat template; pass template='plain' (CLI: --template plain) "
            "to format prompts as 'User: ... Assistant:' text",
            field="template",
        )
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, or a template's raise_exception()
        if type(exc).__module__.split(".")[0] != "jinja2":
            raise
        raise TemplateError(f"the model's chat template rejected the messages: {exc}", field="messages") from exc


def encode_context(tokenizer: Any, chat: Chat, preference: str | None, template: str) -> list[int]:
    """Token ids of one context: the rendered chat, ready for generation."""
    text = chat_to_text(tokenizer, render_chat(chat, preference, template), template)
    # Chat templates already contain BOS where the model wants one.
    ids = tokenizer(text, add_special_tokens=template == "plain")["input_ids"]
    return list(ids)


def split_preference_values(values: Iterable[str]) -> list[str]:
    """Preference arguments (``-p``/``--preferences``, repeatable) → preferences.

    Each value is split on commas when every part is a single word (preset names such
    as ``concise,formal``); otherwise the whole value is one free-text preference, its
    spaces and commas kept (``-p "short, plain answers"``).
    """
    out: list[str] = []
    for value in values:
        parts = [p.strip() for p in value.split(",")]
        if not all(parts) or any(" " in p for p in parts):
            parts = [value.strip()]
        out.extend(p for p in parts if p)
    return out
