"""Offline preference-pair synthesis (``prefalign make-pairs``).

For each training prompt the policy samples a *pool* of answers: one with each
preference's text in the prompt (PAD's guideline template, ``method="pref"``) and a
few without it (``method="base"``). Every preference's judge
(:func:`prefalign.eval.judges.judge_for`: length, readability grade, VADER sentiment,
formality, ...) scores the whole pool; the best-vs-worst answers become a
``{preference, prompt, chosen, rejected}`` row when their judged margin is large
enough and neither answer is collapsed (repetition loops, non-words, too short).

This *distills a proxy judge*: a PRM trained on these rows learns what the judge
measures (e.g. "concise" = fewer words and an early end of turn), not human taste.
To train on real preference pairs instead (P-Soups, HelpSteer2, ...), convert them
to the same JSONL rows and pass them to ``prefalign train-prm`` directly.

Train/evaluation split (see docs/prm.md): training prompts come from
``amulet/HelpSteer_train.json`` and ``amulet/UltraFeedback_ultrachat.json`` rows at
position ≥ 100 only; the first 100 rows of each file, ``UltraFeedback_truthful_qa``,
``personal_preference_eval_preference_data``, ``psoups/koala_eval_50`` and TruthfulQA
are evaluation prompts and never used here (prompts whose text also appears in an
evaluation file are dropped as well).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrefalignError
from .config import DEFAULT_PREFERENCES, PairsConfig  # noqa: F401 (re-exported: the settings of a run)

log = logging.getLogger(__name__)

#: ``pleasant`` and ``friendly`` share the sentiment judge; make-pairs alternates between
#: them prompt by prompt.
ALTERNATES: dict[str, str] = {"pleasant": "friendly"}

#: Training sources (file under the data dir, JSON key of the prompt) and the number of
#: leading rows reserved for evaluation.
TRAIN_SOURCES: tuple[tuple[str, str], ...] = (
    ("amulet/HelpSteer_train.json", "question"),
    ("amulet/UltraFeedback_ultrachat.json", "question"),
)
EVAL_HEAD_ROWS = 100
#: Files whose prompts are evaluation-only (never trained on).
EVAL_ONLY_FILES: tuple[str, ...] = (
    "amulet/UltraFeedback_truthful_qa.json",
    "amulet/personal_preference_eval_preference_data.json",
    "psoups/koala_eval_50.json",
    "truthfulqa/TruthfulQA.csv",
)

#: Minimum judged margin between chosen and rejected, per judge measure (raw units).
DEFAULT_MIN_MARGINS: dict[str, float] = {
    "length_words": 15.0,  # words
    "fk_grade": 2.0,  # Flesch-Kincaid grade levels
    "vader_compound": 0.2,  # VADER compound, -1..1
    "formality_f": 5.0,  # F-score proxy points
}
FALLBACK_MIN_MARGIN = 0.1
#: Judges that are noise on short texts only rank pool answers with at least this many
#: words (so that "expert"/"formal" pairs differ in style, not in length).
JUDGE_MIN_WORDS: dict[str, int] = {"fk_grade": 20, "formality_f": 20}


def default_data_dir() -> Path:
    """The shared data directory by :data:`prefalign.paths.DATA_DIR_RULE`.

    When none exists, the first candidate (so that the error names a path).
    """
    from ..paths import data_dir, data_dir_candidates

    return data_dir() or data_dir_candidates()[0]


# --- prompts and the split -----------------------------------------------------------


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str  # "<file>#<row>"
    text: str


def _load_prompt_texts(path: Path) -> list[str]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [row.get("Question", "") for row in csv.DictReader(f)]
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        for key in ("question", "prompt", "instruction"):
            if isinstance(row, dict) and isinstance(row.get(key), str):
                out.append(row[key])
                break
    return out


def evaluation_prompts(data_dir: Path) -> set[str]:
    """Every prompt text reserved for evaluation (normalised: stripped, lower-cased)."""
    texts: set[str] = set()
    for name in EVAL_ONLY_FILES:
        path = data_dir / name
        if path.is_file():
            texts.update(t.strip().lower() for t in _load_prompt_texts(path))
    for name, _ in TRAIN_SOURCES:
        path = data_dir / name
        if path.is_file():
            texts.update(t.strip().lower() for t in _load_prompt_texts(path)[:EVAL_HEAD_ROWS])
    return texts


def training_prompts(
    data_dir: Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    max_chars: int = 400,
) -> list[PromptRow]:
    """Training prompts (rows ≥ 100 of the training sources), shuffled with ``seed``.

    Prompts longer than ``max_chars`` are skipped (long prompts make training slow and
    the embedded model answers them poorly); so is any prompt whose text is also an
    evaluation prompt.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    held_out = evaluation_prompts(data_dir)
    rows: list[PromptRow] = []
    for name, _key in TRAIN_SOURCES:
        path = data_dir / name
        if not path.is_file():
            raise PrefalignError(
                f"training prompts not found: {path}; pass --data-dir or set $PREFALIGN_DATA "
                "(the default is $PREFALIGN_DATA, else ../shared/data, else ./shared/data)",
                field="data_dir",
            )
        texts = _load_prompt_texts(path)
        for i, text in enumerate(texts):
            if i < EVAL_HEAD_ROWS or not text.strip() or len(text) > max_chars:
                continue
            if text.strip().lower() in held_out:
                continue
            rows.append(PromptRow(f"{name}#{i}", text.strip()))
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


# --- judging -------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    try:
        from ..eval.text import words
    except ImportError:  # pragma: no cover
        import re

        return re.findall(r"[a-z0-9']+", text.lower())
    return words(text)


def repetition_rate(text: str, n: int = 4) -> float:
    """Share of word n-grams repeating an earlier one (0 = no repeats, →1 = a loop)."""
    toks = _words(text)
    total = len(toks) - n + 1
    if total <= 0:
        return 0.0
    return 1.0 - len({tuple(toks[i : i + n]) for i in range(total)}) / total


#: Pieces of PAD's guideline template: an answer that repeats them echoes its prompt.
TEMPLATE_ECHOES: tuple[str, ...] = ("[guideline", "[principle", "[instruction", "your task is to generate response")


@dataclass(frozen=True)
class CollapseFilter:
    """Answers a pair may not use: too short, looping, echoing the template, or non-words."""

    min_words: int = 5
    max_repetition: float = 0.2  # repeated 4-gram share
    max_non_dictionary: float = 0.2
    echoes: tuple[str, ...] = TEMPLATE_ECHOES

    def reason(self, text: str) -> str | None:
        toks = _words(text)
        if len(toks) < self.min_words:
            return "too_short"
        lowered = text.lower()
        if any(echo in lowered for echo in self.echoes):
            return "template_echo"
        if repetition_rate(text, 4) > self.max_repetition:
            return "repetition"
        if len(toks) >= 12:
            try:
                from ..eval.guards import non_dictionary_share
            except ImportError:  # pragma: no cover
                return None
            if non_dictionary_share(text) > self.max_non_dictionary:
                return "non_words"
        return None


def default_judge(preference: str) -> Any:
    """The judge of a preference (``prefalign.eval.judges.judge_for``)."""
    try:
        from ..eval.judges import judge_for
    except ImportError as exc:  # pragma: no cover
        raise PrefalignError("make-pairs needs prefalign.eval.judges (pip install 'prefalign[eval]')") from exc
    return judge_for(preference)


@dataclass
class Candidate:
    text: str
    finish_reason: str
    source: str  # "base" or the preference whose prompt produced it
    seed: int


def pick_pair(
    candidates: Sequence[Candidate],
    scores: Sequence[float],
    direction: int,
    min_margin: float,
    can_choose: Sequence[bool] | None = None,
) -> tuple[int, int] | None:
    """Indices (chosen, rejected) of the best and worst candidate, or None if too close.

    ``can_choose`` (per candidate) restricts which may be *chosen* (e.g. no mild
    repetition in a chosen answer); any candidate may be rejected.
    """
    if len(candidates) < 2:
        return None
    best = best_candidate(scores, direction, can_choose)
    if best is None:
        return None
    aligned = [direction * s for s in scores]
    worst = min(range(len(aligned)), key=lambda i: (aligned[i], i))
    if best == worst or aligned[best] - aligned[worst] < min_margin:
        return None
    return best, worst


def best_candidate(scores: Sequence[float], direction: int, can_choose: Sequence[bool] | None = None) -> int | None:
    """Index of the best-judged candidate that may be chosen (the first on ties), or None."""
    eligible = [i for i in range(len(scores)) if can_choose is None or can_choose[i]]
    if not eligible:
        return None
    return max(eligible, key=lambda i: (direction * scores[i], -i))


# --- synthesis -----------------------------------------------------------------------


@dataclass
class PairStats:
    prompts_done: int = 0
    samples: int = 0
    rows: int = 0
    rejected_collapse: dict[str, int] = field(default_factory=dict)
    no_margin: dict[str, int] = field(default_factory=dict)
    per_preference: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0


def _seed_for(base: int, prompt_id: str, slot: int) -> int:
    digest = hashlib.sha256(f"{base}|{prompt_id}|{slot}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _preference_names(row: PromptRow, preferences: Sequence[str], alternates: dict[str, str], seed: int) -> list[str]:
    """The preferences a prompt is judged under: each of an alternating pair ("pleasant" /
    "friendly") is used on about half of the prompts, chosen by a seeded hash of the prompt."""
    use_alt = _seed_for(seed, row.prompt_id, -1) % 2 == 1
    return [alternates.get(pref, pref) if use_alt else pref for pref in preferences]


def _done_ids(progress: Path) -> set[str]:
    if not progress.is_file():
        return set()
    return {line.strip() for line in progress.read_text(encoding="utf-8").splitlines() if line.strip()}


def synthesize_pairs(
    aligner: Any,
    prompts: Sequence[PromptRow],
    output: Path,
    config: PairsConfig | None = None,
    *,
    collapse: CollapseFilter | None = None,
    judge_factory: Callable[[str], Any] = default_judge,
    progress: Callable[[int], None] | None = None,
    **settings: Any,
) -> PairStats:
    """Sample answer pools and append judged pairs to ``output`` (JSONL), per ``config``.

    ``settings`` are :class:`PairsConfig` fields, given instead of a config (or over it):
    ``synthesize_pairs(aligner, prompts, out, preferences=("concise",), max_new_tokens=12)``.
    ``collapse`` (default :class:`CollapseFilter`) and ``judge_factory`` (preference →
    judge) are the objects that decide which answers may pair and how they rank;
    ``progress`` is called with the number of prompts of each finished batch.

    ``chosen_max_repetition``: a chosen answer may repeat at most this share of its word
    4-grams (stricter than the pool's collapse filter, which only drops loops).

    ``on_policy``: a method name (e.g. ``"pad"``, with the aligner's PRM loaded) whose
    greedy answer under each preference joins that prompt's pool (source
    ``"<method>"``): a clean answer is ranked like the samples; a *collapsed* one
    becomes an extra row ``{chosen: the judge's best clean answer, rejected: the
    collapsed answer, judge: "collapse"}``. This is one round of on-policy DPO: it
    shows the reward model the loops and template echoes it leads decoding into.
    ``on_policy_params`` are that method's parameters (e.g. ``{"w": 2.4,
    "candidate_template": "default"}``). With ``on_policy_pairs``, a *clean* on-policy
    answer that the judge's best clean answer beats by the judge's margin also becomes
    the rejected answer of an extra row (``"pair": "on-policy"``), unless the
    best-vs-worst row already rejects it: the reward model is shown where its own
    decoding falls short, not only where it loops.

    ``template``: the prompt template the sampled answers are drawn under (``pad``, PAD's
    guideline prompt; use the template the PRM will be trained in, ``train-prm --template``).

    ``greedy_pref``: also decode each preference greedily with ``pref`` (default
    template), the answer evaluation compares PAD against; it joins the pool (source
    ``"pref-greedy:<preference>"``) and is ranked like the samples.

    Every sampled answer (collapsed ones with their reason) is appended to
    ``<output>.pools.jsonl``, so pairs can be re-ranked later without re-sampling.

    Resumable: prompts already processed are listed in ``<output>.done`` and skipped
    (rows are appended and flushed per batch, so an interruption loses at most one batch).

    The steps of a batch: :func:`_batch_requests` (what to decode), :func:`_collect_pools`
    (decode, drop collapsed answers, log the pools) and :func:`_write_pairs` (judge each
    preference's pool and write its rows).
    """
    if config is None:
        config = PairsConfig(**settings)
    elif settings:
        config = dataclasses.replace(config, **settings)
    run = _PairsRun.start(config, output, collapse, judge_factory)
    todo = [p for p in prompts if p.prompt_id not in run.done]
    stats = PairStats(prompts_done=len(prompts) - len(todo))
    start = time.monotonic()
    with (
        run.output.open("a", encoding="utf-8") as out,
        run.done_path.open("a", encoding="utf-8") as done_file,
        run.pools_path.open("a", encoding="utf-8") as pools_file,
    ):
        for b in range(0, len(todo), config.prompts_per_batch):
            if config.time_budget_s is not None and time.monotonic() - start > config.time_budget_s:
                log.info("time budget reached after %d prompts", stats.prompts_done)
                break
            batch = todo[b : b + config.prompts_per_batch]
            names = [_preference_names(row, config.preferences, run.alternates, config.seed) for row in batch]
            requests, meta = _batch_requests(aligner, config, batch, names)
            pools, collapsed = _collect_pools(run, batch, meta, aligner.engine.generate(requests), stats, pools_file)
            for row_index, row in enumerate(batch):
                for name in names[row_index]:
                    _write_pairs(run, row, name, pools[row_index], collapsed[row_index].get(name), stats, out)
                done_file.write(row.prompt_id + "\n")
                stats.prompts_done += 1
            out.flush()
            pools_file.flush()
            done_file.flush()
            if progress:
                progress(len(batch))
    stats.seconds = time.monotonic() - start
    return stats


@dataclass
class _PairsRun:
    """One :func:`synthesize_pairs` call's settings, judges and files."""

    config: PairsConfig
    collapse: CollapseFilter
    alternates: dict[str, str]
    margins: dict[str, float]
    judges: dict[str, Any]
    output: Path
    done_path: Path
    pools_path: Path
    done: set[str]

    @classmethod
    def start(cls, config: PairsConfig, output: Path, collapse: CollapseFilter | None,
              judge_factory: Callable[[str], Any]) -> _PairsRun:
        """Build every preference's judge and open the run's files (emptied unless resuming)."""
        alternates = ALTERNATES if config.alternates is None else config.alternates
        names = list(dict.fromkeys([*config.preferences, *(alternates.get(p) for p in config.preferences if alternates.get(p))]))
        judges = {p: judge_factory(p) for p in names}
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        done_path = output.with_name(output.name + ".done")
        pools_path = output.with_name(output.name + ".pools.jsonl")
        done = _done_ids(done_path) if config.resume else set()
        if not config.resume:
            output.write_text("", encoding="utf-8")
            done_path.write_text("", encoding="utf-8")
            pools_path.write_text("", encoding="utf-8")
        return cls(
            config=config, collapse=collapse or CollapseFilter(), alternates=alternates,
            margins={**DEFAULT_MIN_MARGINS, **(config.min_margins or {})}, judges=judges,
            output=output, done_path=done_path, pools_path=pools_path, done=done,
        )


def _batch_requests(
    aligner: Any, config: PairsConfig, batch: Sequence[PromptRow], names: Sequence[Sequence[str]]
) -> tuple[list[Any], list[tuple[int, str, int]]]:
    """The engine requests of a batch and, per request, (row index, source, seed)."""
    requests, meta = [], []
    for row_index, row in enumerate(batch):
        # Sampled answers: one per preference, then base_samples without one (slot = seed index).
        sampled = [(name, "pref", name) for name in names[row_index]] + [(None, "base", "base")] * config.base_samples
        for slot, (preference, method, source) in enumerate(sampled):
            s = _seed_for(config.seed, row.prompt_id, slot)
            requests.append(
                aligner.build_request(
                    row.text, preference, method, template=config.template, temperature=config.temperature,
                    top_p=config.top_p, seed=s, max_new_tokens=config.max_new_tokens,
                )
            )
            meta.append((row_index, source, s))
        if config.on_policy:
            for name in names[row_index]:
                requests.append(aligner.build_request(
                    row.text, name, config.on_policy, max_new_tokens=config.max_new_tokens, **config.on_policy_params,
                ))
                meta.append((row_index, f"{config.on_policy}:{name}", -1))
        if config.greedy_pref:
            for name in names[row_index]:
                requests.append(aligner.build_request(row.text, name, "pref", max_new_tokens=config.max_new_tokens))
                meta.append((row_index, f"pref-greedy:{name}", -1))
    return requests, meta


def _collect_pools(
    run: _PairsRun, batch: Sequence[PromptRow], meta: Sequence[tuple[int, str, int]], results: Sequence[Any],
    stats: PairStats, pools_file: Any,
) -> tuple[list[list[Candidate]], list[dict[str, Candidate]]]:
    """Each prompt's pool of clean answers, and its on-policy answers that collapsed (per
    preference); every answer is logged to the pools file."""
    on_policy = run.config.on_policy
    pools: list[list[Candidate]] = [[] for _ in batch]
    collapsed: list[dict[str, Candidate]] = [{} for _ in batch]
    for (row_index, source, s), res in zip(meta, results):
        stats.samples += 1
        stats.tokens += res.usage.completion_tokens
        reason = run.collapse.reason(res.text)
        candidate = Candidate(res.text.strip(), res.finish_reason, source, s)
        pools_file.write(json.dumps({
            "prompt_id": batch[row_index].prompt_id, "source": source, "seed": s, "text": candidate.text,
            "finish_reason": res.finish_reason, "collapsed": reason,
        }, ensure_ascii=False) + "\n")
        if reason:
            stats.rejected_collapse[reason] = stats.rejected_collapse.get(reason, 0) + 1
            if on_policy and source.startswith(on_policy + ":"):
                collapsed[row_index][source.split(":", 1)[1]] = candidate
            continue
        pools[row_index].append(candidate)
    return pools, collapsed


def _write_pairs(
    run: _PairsRun, row: PromptRow, name: str, pool: Sequence[Candidate], loop: Candidate | None,
    stats: PairStats, out: Any,
) -> None:
    """Judge ``pool`` under preference ``name`` and write its rows: best vs worst, the
    on-policy answer (``on_policy_pairs``) and the collapsed on-policy answer ``loop``."""
    config = run.config
    judge = run.judges[name]

    def write(record: dict[str, Any], key: str) -> None:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        stats.rows += 1
        stats.per_preference[key] = stats.per_preference.get(key, 0) + 1

    min_words = JUDGE_MIN_WORDS.get(judge.name, 0)
    candidates = [c for c in pool if len(_words(c.text)) >= min_words]
    scores = judge.score_many([c.text for c in candidates], prompts=[row.text] * len(candidates)) if candidates else []
    margin = run.margins.get(judge.name, FALLBACK_MIN_MARGIN) * config.margin_scale
    can_choose = [
        config.chosen_max_repetition is None or repetition_rate(c.text, 4) <= config.chosen_max_repetition
        for c in candidates
    ]
    picked = pick_pair(candidates, scores, judge.direction, margin, can_choose)
    if picked is None:
        stats.no_margin[name] = stats.no_margin.get(name, 0) + 1
    else:
        c, r = picked
        write(_pair_record(name, row, judge, candidates[c], candidates[r], scores[c], scores[r]), name)
    if config.on_policy_pairs:
        own = next((i for i, c in enumerate(candidates) if c.source == f"{config.on_policy}:{name}"), None)
        best = best_candidate(scores, judge.direction, can_choose) if own is not None else None
        already = picked is not None and picked[1] == own
        if best is not None and not already and judge.direction * (scores[best] - scores[own]) >= margin:
            record = _pair_record(name, row, judge, candidates[best], candidates[own], scores[best], scores[own])
            record["pair"] = "on-policy"
            write(record, f"{name}/on-policy")
    best = best_candidate(scores, judge.direction, can_choose) if loop is not None else None
    if best is not None:
        record = _pair_record(name, row, judge, candidates[best], loop, scores[best], None)
        record["judge"] = "collapse"
        write(record, f"{name}/collapse")


def _pair_record(
    preference: str, row: PromptRow, judge: Any, chosen: Candidate, rejected: Candidate,
    chosen_score: float, rejected_score: float | None,
) -> dict[str, Any]:
    return {
        "preference": preference,
        "prompt": row.text,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "prompt_id": row.prompt_id,
        "judge": judge.name,
        "direction": judge.direction,
        "chosen_score": round(float(chosen_score), 4),
        "rejected_score": None if rejected_score is None else round(float(rejected_score), 4),
        "chosen_complete": chosen.finish_reason == "stop",
        "rejected_complete": rejected.finish_reason == "stop",
        "chosen_source": chosen.source,
        "rejected_source": rejected.source,
    }


def filter_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop rows that :data:`JUDGE_MIN_WORDS` would have excluded (for pair files made
    before that rule, or by other tools)."""
    out = []
    for row in rows:
        need = JUDGE_MIN_WORDS.get(str(row.get("judge", "")), 0)
        if min(len(_words(row["chosen"])), len(_words(row["rejected"]))) >= need:
            out.append(row)
    return out


def read_rows(path: Path) -> Iterable[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
