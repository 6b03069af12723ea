"""The papers' evaluation protocols as presets: ``prefalign eval --protocol amulet|pad``.

A :class:`Protocol` fixes what the paper's released scripts fix: datasets (from the
shared data directory), preferences, methods, chat template, token budget and judges.
Options given on the command line win over the preset (``--limit``, ``--model``,
``--dataset``, ``--preferences``, ``--methods``, ``--template``); a preset's reward
models are replaced as a group by any ``--judge rm:...`` (e.g. local copies), and an
``--judge llm:URL`` gets the paper's judge model and order unless given. Where
prefalign deliberately differs from the scripts, docs/evaluation.md says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrefalignError, UnknownNameError

__all__ = ["PROTOCOLS", "SHARED_DATA_ENV", "Protocol", "ResolvedProtocol", "resolve_protocol", "shared_data_dir"]

SHARED_DATA_ENV = "PREFALIGN_SHARED_DATA"
"""Environment variable naming the shared data directory (default: ``../shared/data``
from the current directory or from the source checkout)."""

ARMORM = "RLHFlow/ArmoRM-Llama3-8B-v0.1"


@dataclass(frozen=True)
class Protocol:
    """A paper's evaluation setting."""

    name: str
    description: str
    datasets: tuple[str, ...]  # relative to the shared data directory
    preferences: tuple[str, ...]
    methods: tuple[str, ...]
    template: str | None
    max_new_tokens: int
    rm_judges: tuple[str, ...]  # rm: specs
    llm_model: str
    llm_order: str  # "random" (one call in random order) or "swap"


PROTOCOLS: dict[str, Protocol] = {
    "amulet": Protocol(
        name="amulet",
        description="Amulet (ICLR 2025): 4 datasets x 8 preferences, Amulet's system template, greedy, 128 tokens; "
        "ArmoRM objective 6 with the preference in the user turn, and a GPT-4o pairwise judge",
        datasets=(
            "amulet/HelpSteer_train.json", "amulet/UltraFeedback_truthful_qa.json",
            "amulet/UltraFeedback_ultrachat.json", "amulet/personal_preference_eval_preference_data.json",
        ),
        preferences=("amulet:*",),
        methods=("base", "pref", "beam", "la", "amulet"),
        template="amulet",
        max_new_tokens=128,
        rm_judges=(f"rm:{ARMORM}@ultrafeedback-instruction_following",),
        llm_model="gpt-4o-2024-05-13",
        llm_order="random",
    ),
    "pad": Protocol(
        name="pad",
        description="PAD (ICLR 2025): P-Soups Koala prompts x PAD's principles (helpful, harmless, humor), PAD's "
        "guideline template; gpt2-large helpful/harmless reward models, a humour classifier and ArmoRM "
        "objectives 0 and 10, judging the answer to the bare instruction",
        datasets=("psoups/koala_eval_50.json",),
        preferences=("pad:helpful", "pad:harmless", "pad:humor"),
        methods=("base", "pref", "pad"),
        template=None,  # each method's own: PAD's guideline template for pad
        max_new_tokens=128,
        rm_judges=(
            "rm:Ray2333/gpt2-large-helpful-reward_model,pref=no,only=pad:helpful",
            "rm:Ray2333/gpt2-large-harmless-reward_model,pref=no,only=pad:harmless",
            "rm:mohameddhiab/humor-no-humor@1,mode=raw,format=hh,pref=no,only=pad:humor",
            f"rm:{ARMORM}@helpsteer-helpfulness,pref=no,only=pad:helpful",
            f"rm:{ARMORM}@beavertails-is_safe,pref=no,only=pad:harmless",
        ),
        llm_model="gpt-4",
        llm_order="swap",
    ),
}


def shared_data_dir() -> Path:
    """The shared data directory: ``$PREFALIGN_SHARED_DATA``, else ``../shared/data`` from
    the current directory, else the one beside the source checkout."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data",
                  Path(__file__).resolve().parents[3].parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


@dataclass
class ResolvedProtocol:
    """The eval options after applying a protocol (what the CLI runs)."""

    datasets: list[str]
    preferences: list[str]
    methods: list[str]
    template: str | None
    max_new_tokens: int
    judges: list[str]
    judge_models: list[str]


def _spec_has(spec: str, key: str) -> bool:
    return any(part.strip().startswith(f"{key}=") for part in spec.split(",")[1:])


def resolve_protocol(
    name: str | None,
    *,
    datasets: Sequence[str] = (),
    preferences: Sequence[str] = (),
    methods: Sequence[str] = (),
    template: str | None = None,
    max_new_tokens: int | None = None,
    judges: Sequence[str] = (),
    judge_models: Sequence[str] = (),
) -> ResolvedProtocol:
    """Fill what the user left unset from protocol ``name`` (None: no protocol, defaults only)."""
    if name is None:
        return ResolvedProtocol(list(datasets), list(preferences), list(methods) or ["base", "pref", "la", "amulet"],
                                template, 128 if max_new_tokens is None else max_new_tokens, list(judges), list(judge_models))
    key = name.strip().lower()
    if key not in PROTOCOLS:
        raise UnknownNameError(f"unknown protocol {name!r}; choose {', '.join(sorted(PROTOCOLS))}", field="protocol")
    p = PROTOCOLS[key]
    if datasets:
        ds = list(datasets)
    else:
        root = shared_data_dir()
        ds = [str(root / d) for d in p.datasets]
        missing = [d for d in ds if not Path(d).is_file()]
        if missing:
            raise PrefalignError(
                f"protocol {p.name}: dataset files not found: {', '.join(missing)}; set ${SHARED_DATA_ENV} to the "
                "shared data directory or pass --dataset",
                field="dataset",
            )
    user_rm = any(j.strip().lower().startswith("rm:") for j in judges)
    out_judges: list[str] = [] if user_rm else list(p.rm_judges)
    models = list(judge_models)
    for j in judges:
        if j.strip().lower().startswith("llm:"):
            if p.llm_order != "swap" and not _spec_has(j, "order"):
                j = f"{j},order={p.llm_order}"
            if not models and not _spec_has(j, "model"):
                j = f"{j},model={p.llm_model}"
        out_judges.append(j)
    return ResolvedProtocol(
        datasets=ds,
        preferences=list(preferences) or list(p.preferences),
        methods=list(methods) or list(p.methods),
        template=template if template is not None else p.template,
        max_new_tokens=p.max_new_tokens if max_new_tokens is None else max_new_tokens,
        judges=out_judges,
        judge_models=models,
    )
