"""The settings of pair synthesis (:class:`PairsConfig`) and PRM training (:class:`TrainConfig`).

One place for each setting's name, default and meaning (help in each field's
``metadata``). ``prefalign make-pairs`` and ``prefalign train-prm`` build their options
from these fields (:func:`prefalign.cli_options.field_option`) and build the config
before anything loads, so its checks run first. Only the standard library is imported
here, so the command line can read the defaults without loading torch's training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrefalignError


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and the help text its command-line option shows."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _check(ok: bool, cls: str, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise PrefalignError(f"{cls}.{name} must be {rule}, got {value!r}", field=name)


#: The six (+1) preferences of the shipped PRM. ``pleasant`` and ``friendly`` share the
#: sentiment judge; make-pairs alternates between them prompt by prompt.
DEFAULT_PREFERENCES: tuple[str, ...] = ("concise", "verbose", "elementary", "expert", "pleasant", "formal")
#: The training checkpoint's file name, in :meth:`TrainConfig.checkpoint_path`.
CHECKPOINT_NAME = "checkpoint.pt"


def require_checkpoint(file: Path) -> None:
    """``--resume`` needs the checkpoint ``file`` (checked by the CLI before the policy loads, and by training)."""
    if not Path(file).is_file():
        raise PrefalignError(f"--resume: no checkpoint at {file}; run without --resume to start", field="resume")


#: The templates answers may be sampled under / a PRM may read its preference through.
PRM_TEMPLATES: tuple[str, ...] = ("pad", "default")


def _check_template(config: Any) -> None:
    """Pairs are sampled, and a PRM reads its preference, in one of :data:`PRM_TEMPLATES`."""
    _check(config.template in PRM_TEMPLATES, type(config).__name__, "template", " or ".join(PRM_TEMPLATES), config.template)


@dataclass(frozen=True)
class PairsConfig:
    """How :func:`prefalign.prm.pairs.synthesize_pairs` samples, judges and pairs answers."""

    preferences: tuple[str, ...] = setting(DEFAULT_PREFERENCES, "presets (or sentences) to make pairs for")
    base_samples: int = setting(2, "answers sampled without a preference per prompt")
    temperature: float = setting(0.8, "sampling temperature")
    top_p: float = setting(1.0, "nucleus sampling mass")
    max_new_tokens: int = setting(96, "tokens per sampled answer")
    prompts_per_batch: int = setting(4, "prompts decoded together")
    seed: int = setting(0, "shuffling and sampling seed")
    #: Minimum judged margin per judge measure (raw units), over :data:`~prefalign.prm.pairs.DEFAULT_MIN_MARGINS`.
    min_margins: dict[str, float] | None = setting(None, "minimum judged margin per judge measure")
    margin_scale: float = setting(1.0, "multiply every judge's minimum margin")
    #: Preferences that alternate prompt by prompt (None: :data:`~prefalign.prm.pairs.ALTERNATES`).
    alternates: dict[str, str] | None = setting(None, "preferences that alternate prompt by prompt")
    resume: bool = setting(True, "continue an interrupted run, or start afresh")
    time_budget_s: float | None = setting(None, "stop after this many seconds (None = no limit)")
    chosen_max_repetition: float | None = setting(
        0.1, "most share of repeated word 4-grams in a chosen answer (1 = no limit)"
    )
    on_policy: str | None = setting(
        None, "also decode greedily with this method (e.g. pad); its collapsed answers become rejected ones"
    )
    on_policy_params: dict[str, Any] = setting({}, "parameters of the on_policy method")
    on_policy_pairs: bool = setting(
        False, "a clean on-policy answer the judge's best beats by the margin is rejected too"
    )
    greedy_pref: bool = setting(False, "also decode each preference greedily with pref (default template)")
    template: str = setting("pad", "template answers are sampled under: pad or default (match train-prm --template)")

    def __post_init__(self) -> None:
        name = type(self).__name__
        prefs = (self.preferences,) if isinstance(self.preferences, str) else tuple(self.preferences)
        object.__setattr__(self, "preferences", prefs)
        object.__setattr__(self, "on_policy_params", dict(self.on_policy_params or {}))
        _check(bool(prefs) and all(isinstance(p, str) and p.strip() for p in prefs), name, "preferences",
               "at least one preference (e.g. concise,verbose)", self.preferences)
        for key, low in (("base_samples", 0), ("max_new_tokens", 1), ("prompts_per_batch", 1)):
            value = getattr(self, key)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, key, f"an integer ≥ {low}", value)
        _check(math.isfinite(self.temperature) and self.temperature >= 0, name, "temperature", "≥ 0", self.temperature)
        _check(0 < self.top_p <= 1, name, "top_p", "in (0, 1]", self.top_p)
        _check(math.isfinite(self.margin_scale) and self.margin_scale >= 0, name, "margin_scale", "≥ 0", self.margin_scale)
        _check(self.time_budget_s is None or self.time_budget_s > 0, name, "time_budget_s", "> 0 or None", self.time_budget_s)
        _check(self.chosen_max_repetition is None or 0 <= self.chosen_max_repetition <= 1, name,
               "chosen_max_repetition", "in [0, 1] or None", self.chosen_max_repetition)
        _check_template(self)
        if (self.on_policy_params or self.on_policy_pairs) and not self.on_policy:
            raise PrefalignError(
                "on_policy_params and on_policy_pairs need an on_policy method (e.g. 'pad'; CLI: --on-policy pad)",
                field="on_policy",
            )


@dataclass
class TrainConfig:
    """How :func:`prefalign.prm.train.train` trains a PRM with DPO (``prefalign train-prm``)."""

    data: Path | str
    output: Path | str
    model: str = setting("embedded", "policy: 'embedded', a directory, a .gguf or a hub id")
    beta: float = setting(0.1, "DPO beta")
    lr: float = setting(5e-4, "learning rate (AdamW)")
    #: The Linear(d, d) layer's learning rate is ``lr * linear_lr_scale``: Adam moves every
    #: one of its d² entries by about the learning rate per step, and near the identity
    #: that changes every logit, so it learns more slowly than the LoRA matrices.
    linear_lr_scale: float = setting(0.1, "the Linear(d, d) layer's learning rate is lr × this")
    epochs: float = setting(1.0, "passes over the training pairs (fractions allowed)")
    batch_size: int = setting(4, "pairs per optimiser step")
    micro_batch: int = setting(1, "pairs per forward pass")
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: int = setting(16, "LoRA alpha")
    target_modules: list[str] | None = setting(None, "modules LoRA adapts (None: the attention and MLP projections)")
    #: Put all pairs of a prompt in one optimiser step (see ``_plan``).
    group_by_prompt: bool = setting(
        True, "keep a prompt's pairs in one step (mirrored pairs cancel what does not depend on the preference)"
    )
    #: Adapt only the top N decoder blocks (None = all): training cost falls roughly
    #: in proportion, since lower blocks need no backward pass.
    lora_top_layers: int | None = setting(None, "adapt only the top N decoder blocks (0 = all; faster)")
    #: Measure the untrained PRM on the held-out pairs. Off by default: it *is* the
    #: reference (bit-identical, tested), so every margin is 0 and accuracy 0.5.
    measure_before: bool = setting(False, "measure the untrained PRM on the held-out pairs")
    held_out: float = setting(0.1, "share of prompts held out for evaluation")
    max_prompt_tokens: int = setting(160, "drop pairs with longer prompts")
    max_answer_tokens: int = setting(96, "truncate answers to this many tokens")
    bf16: bool = setting(True, "bfloat16 autocast on CPU (faster where supported)")
    checkpoint_dir: Path | str | None = setting(None, "checkpoints (default: OUTPUT-checkpoints beside OUTPUT)")
    checkpoint_every: int = setting(10, "optimiser steps between checkpoints")
    resume: bool = setting(False, "continue from the latest checkpoint")
    time_budget_s: float | None = setting(None, "stop training after this many seconds, then evaluate and save")
    seed: int = setting(0, "random seed")
    warmup_steps: int | None = setting(None, "linear warm-up steps (None: a tenth of the steps, 1 to 10)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 = none)")
    save_dtype: str = setting("float16", "dtype of the saved adapters")
    progress: bool = setting(True, "progress bars on stderr")
    command: str | None = setting(None, "the command line recorded in the report")
    #: Stop after this many optimiser steps in this call (tests of resume); None = run to the end.
    stop_after_steps: int | None = setting(None, "stop after this many optimiser steps in this call")
    #: Start from this trained PRM (its LoRA layout replaces lora_r/lora_alpha/
    #: target_modules/lora_top_layers) instead of an untrained one: a further round of
    #: training on new pairs. The reference stays the policy, so the PRM's reward keeps
    #: its meaning (log π_PRM − log π_policy); the held-out "before" is then measured.
    init_from: Path | str | None = setting(
        None, "start from this trained PRM (a further round; its LoRA layout wins)"
    )
    #: Prompt template the pairs are rendered in (the PRM reads the preference through
    #: it; recorded in prm_config.json). PAD's paper: the ``pad`` guideline template.
    template: str = setting("pad", "template the PRM reads the preference through: pad (the paper's) or default")

    def __post_init__(self) -> None:
        _check_template(self)

    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.with_name(out.name + "-checkpoints")
