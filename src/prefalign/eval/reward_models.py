"""Reward-model judges: transformers sequence-classification models as answer scorers.

A :class:`RewardModelJudge` scores ``(prompt, answer)`` pairs with any
``AutoModelForSequenceClassification`` model given by local directory or hub id:
scalar reward models (``OpenAssistant/reward-model-deberta-v3-large-v2``,
``Ray2333/gpt2-large-helpful-reward_model``, Skywork-Reward), multi-objective ones
(ArmoRM: pick an objective by index or name) and classifiers (the probability of one
label, e.g. a humour classifier).

Spec strings (what ``--judge`` takes after ``rm:``)::

    PATH_OR_ID[@HEAD][,key=value...]

``HEAD`` is an output index (``@6``) or a label name from ``config.id2label`` (or
ArmoRM's objective names, ``@ultrafeedback-instruction_following``). Options:

- ``format=chat|hh|answer`` -- how the input is laid out (default ``auto``: the judge
  tokenizer's chat template when it has one; otherwise ``answer`` for classifiers and
  ``hh`` for reward models, see :data:`HH_LAYOUT`);
- ``mode=raw|prob|sigmoid`` -- the score: the raw output, the softmax probability of
  the head's label, or its sigmoid (default ``auto``: ``prob`` for single-label
  classifiers, ``sigmoid`` for multi-label ones, ``raw`` otherwise);
- ``pref=yes|no`` -- append the preference text to the user turn, as Amulet did for
  ArmoRM (default ``yes``; PAD's helpful/harmless models judge without it);
- ``only=NAME+NAME`` -- judge only rows of these preferences (e.g. ``only=pad:humor``);
- ``batch=N``, ``max_length=N`` -- batch size (default 8) and token limit (default the
  tokenizer's ``model_max_length``, capped at 4096; longer inputs are cut and counted).

Models that ship their own code (``auto_map`` in config.json, e.g. ArmoRM) load only
with ``trust_remote_code=True`` (the CLI's ``--judge-trust-remote-code``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from ..errors import ModelLoadError, PrefalignError

__all__ = ["ARMORM_OBJECTIVES", "HH_LAYOUT", "RewardModelJudge", "RewardModelSpec", "check_rm_spec", "parse_rm_spec"]

#: The 19 objective columns of ``RLHFlow/ArmoRM-Llama3-8B-v0.1`` (its model card), in order.
ARMORM_OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)
_ARMORM_ARCH = "LlamaForRewardModelWithGating"

#: The prompt/answer layout for judges without a chat template (``format=hh``): the
#: Anthropic-HH layout of the ``Ray2333/gpt2-large-*-reward_model`` cards, encoded as a
#: tokenizer *pair* ``(HH_LAYOUT.format(prompt=...), answer)`` exactly as those cards do.
HH_LAYOUT = "\n\nHuman: {prompt} \n\nAssistant:"

Format = Literal["auto", "chat", "hh", "answer"]
Mode = Literal["auto", "raw", "prob", "sigmoid"]
_GENERIC_LABEL = re.compile(r"LABEL_\d+")


@dataclass(frozen=True)
class RewardModelSpec:
    """A parsed ``rm:`` judge spec (see the module docstring)."""

    source: str
    head: int | str | None = None
    format: Format = "auto"
    mode: Mode = "auto"
    preference: bool = True
    only: tuple[str, ...] = ()
    batch_size: int = 8
    max_length: int | None = None

    @property
    def spec(self) -> str:
        """The spec string that parses back to this spec."""
        out = self.source + (f"@{self.head}" if self.head is not None else "")
        opts = []
        if self.format != "auto":
            opts.append(f"format={self.format}")
        if self.mode != "auto":
            opts.append(f"mode={self.mode}")
        if not self.preference:
            opts.append("pref=no")
        if self.only:
            opts.append("only=" + "+".join(self.only))
        if self.batch_size != 8:
            opts.append(f"batch={self.batch_size}")
        if self.max_length is not None:
            opts.append(f"max_length={self.max_length}")
        return ",".join([out, *opts])


def _int_option(key: str, value: str, spec: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise PrefalignError(f"judge spec {spec!r}: {key} must be an integer ≥ 1, got {value!r}", field="judge")
    return n


def parse_rm_spec(text: str) -> RewardModelSpec:
    """Parse ``PATH_OR_ID[@HEAD][,key=value...]`` (the part after ``rm:``)."""
    spec = text.strip()
    head_part, *opts = spec.split(",")
    source, at, head = head_part.rpartition("@") if "@" in head_part else (head_part, "", "")
    source = source.strip()
    if not source:
        raise PrefalignError(f"judge spec 'rm:{spec}' names no model; write rm:PATH_OR_ID[@HEAD]", field="judge")
    parsed_head: int | str | None = None
    if at:
        if not head.strip():
            raise PrefalignError(f"judge spec 'rm:{spec}': nothing after '@'; give an output index or label", field="judge")
        parsed_head = int(head) if head.strip().isdigit() else head.strip()
    kwargs: dict[str, Any] = {}
    for opt in opts:
        key, eq, value = (s.strip() for s in opt.partition("="))
        if not eq:
            raise PrefalignError(f"judge spec 'rm:{spec}': option {opt!r} is not key=value", field="judge")
        if key == "format":
            if value not in ("auto", "chat", "hh", "answer"):
                raise PrefalignError(f"judge spec 'rm:{spec}': format must be auto, chat, hh or answer", field="judge")
            kwargs["format"] = value
        elif key == "mode":
            if value not in ("auto", "raw", "prob", "sigmoid"):
                raise PrefalignError(f"judge spec 'rm:{spec}': mode must be auto, raw, prob or sigmoid", field="judge")
            kwargs["mode"] = value
        elif key == "pref":
            if value.lower() not in ("yes", "no", "true", "false", "1", "0"):
                raise PrefalignError(f"judge spec 'rm:{spec}': pref must be yes or no", field="judge")
            kwargs["preference"] = value.lower() in ("yes", "true", "1")
        elif key == "only":
            kwargs["only"] = tuple(p.strip() for p in value.split("+") if p.strip())
        elif key == "batch":
            kwargs["batch_size"] = _int_option(key, value, spec)
        elif key == "max_length":
            kwargs["max_length"] = _int_option(key, value, spec)
        else:
            raise PrefalignError(
                f"judge spec 'rm:{spec}': unknown option {key!r}; known: format, mode, pref, only, batch, max_length",
                field="judge",
            )
    return RewardModelSpec(source=source, head=parsed_head, **kwargs)


def _hub_error(source: str, exc: Exception) -> ModelLoadError:
    if not hub_reachable():
        return ModelLoadError(
            f"reward model {source!r} is not a local directory, the Hugging Face hub is not reachable from here, "
            f"and the local hub cache does not have it: download it where the hub is reachable "
            f"(`hf download {source} --local-dir DIR`) and pass rm:DIR",
            field="judge",
        )
    return ModelLoadError(f"cannot load reward model {source!r} from the hub: {exc} (check the id)", field="judge")


def _config_dict(source: str) -> dict[str, Any]:
    """config.json of a local directory or hub id, read without importing model code."""
    path = Path(source).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{path} has no config.json; give a transformers model directory", field="judge")
        return json.loads(cfg.read_text(encoding="utf-8"))
    if source.startswith((".", "/", "~")) or path.exists():
        raise ModelLoadError(f"reward model path not found or not a directory: {path}", field="judge")
    from transformers import PretrainedConfig

    try:
        # Unreachable hub: only the local hub cache, at once (the hub client would retry for ~30 s).
        config, _ = PretrainedConfig.get_config_dict(source, local_files_only=not hub_reachable())
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc
    return config


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) accepts a TCP connection within 3 s;
    False under ``HF_HUB_OFFLINE=1``. The probe runs once per process and endpoint."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return _probe(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def preference_selected(preference: str, only: Sequence[str]) -> bool:
    """Whether ``only`` (empty: everything) names ``preference``, with or without its
    paper's namespace (``only=pad:humor`` also selects rows of ``humor``)."""
    if not only:
        return True
    bare = {o.split(":", 1)[-1].lower() for o in only}
    return preference in only or preference.split(":", 1)[-1].lower() in bare


def check_rm_spec(spec: RewardModelSpec | str, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Read the judge's config.json and refuse custom code without opt-in, loading no weights.

    What ``prefalign eval --judge rm:...`` runs before decoding starts, so a wrong path,
    an unreachable hub or a missing ``--judge-trust-remote-code`` fails in seconds.
    """
    s = parse_rm_spec(spec) if isinstance(spec, str) else spec
    config = _config_dict(s.source)
    _refuse_remote_code(s.source, config, trust_remote_code)
    return config


def _refuse_remote_code(source: str, config: dict[str, Any], trust_remote_code: bool) -> None:
    auto_map = config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise ModelLoadError(
            f"reward model {source!r} ships its own model code (auto_map: {', '.join(sorted(auto_map))}); "
            "loading it runs that code. If you trust it, rerun with --judge-trust-remote-code "
            "(Python: trust_remote_code=True).",
            field="judge",
        )


class RewardModelJudge:
    """A sequence-classification model that scores answers (higher = better).

    ``score_many(items)`` takes ``(prompt, answer, preference_text)`` triples and
    returns one float per item, batched. ``model=``/``tokenizer=`` inject an already
    loaded model (tests); otherwise the spec's source is loaded on ``device`` in
    ``dtype`` (default float32 on CPU, bfloat16 on CUDA).
    """

    kind = "rm"

    def __init__(
        self,
        spec: RewardModelSpec | str,
        *,
        trust_remote_code: bool = False,
        device: str | None = None,
        dtype: Any = None,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.spec = parse_rm_spec(spec) if isinstance(spec, str) else spec
        self.trust_remote_code = trust_remote_code
        self.truncated = 0  # inputs cut at max_length so far
        if model is None:
            model, tokenizer = self._load(device, dtype)
        elif tokenizer is None:
            raise PrefalignError("pass tokenizer= with model=", field="judge")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            # sequence-classification heads pool at the last non-pad token; they need the id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.labels = self._labels()
        self.head = self._resolve_head()
        self.mode = self._resolve_mode()
        self.format = self._resolve_format()
        limit = getattr(self.tokenizer, "model_max_length", None) or 4096
        self.max_length = self.spec.max_length or min(int(limit) if limit < 10**9 else 4096, 4096)

    # --- loading and configuration ----------------------------------------------------

    def _load(self, device: str | None, dtype: Any) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = self.spec.source
        config = _config_dict(source)  # fails fast (offline hub, missing dir) before any weights
        _refuse_remote_code(source, config, self.trust_remote_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        path = Path(source).expanduser()
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if not path.is_dir() and not hub_reachable():
            kwargs["local_files_only"] = True  # the local hub cache only
        src = str(path) if path.is_dir() else source
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            if not path.is_dir():
                raise _hub_error(source, exc) from exc
            raise ModelLoadError(f"cannot load reward model {source!r}: {exc}", field="judge") from exc
        return model.to(device), tokenizer

    @property
    def is_armorm(self) -> bool:
        return _ARMORM_ARCH in (getattr(self.model.config, "architectures", None) or [])

    def _labels(self) -> list[str]:
        if self.is_armorm:
            return list(ARMORM_OBJECTIVES)
        id2label = getattr(self.model.config, "id2label", None) or {}
        n = int(getattr(self.model.config, "num_labels", len(id2label)) or 1)
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]

    def _resolve_head(self) -> int | None:
        head = self.spec.head
        n = len(self.labels)
        if head is None:
            if n == 1 or self.is_armorm:
                return None  # the single output (ArmoRM: its gated preference score)
            raise PrefalignError(
                f"reward model {self.spec.source!r} has {n} outputs ({', '.join(self.labels)}); "
                f"pick one: rm:{self.spec.source}@INDEX or @LABEL",
                field="judge",
            )
        if isinstance(head, int):
            if not 0 <= head < n:
                raise PrefalignError(
                    f"reward model {self.spec.source!r} has outputs 0..{n - 1} ({', '.join(self.labels)}); "
                    f"@{head} is out of range",
                    field="judge",
                )
            return head
        lowered = [label.lower() for label in self.labels]
        if head.lower() in lowered:
            return lowered.index(head.lower())
        raise PrefalignError(
            f"reward model {self.spec.source!r} has no output named {head!r}; outputs: "
            + ", ".join(f"{i}={label}" for i, label in enumerate(self.labels)),
            field="judge",
        )

    def _resolve_mode(self) -> str:
        if self.spec.mode != "auto":
            return self.spec.mode
        problem = getattr(self.model.config, "problem_type", None)
        if self.is_armorm or len(self.labels) == 1 or problem == "regression":
            return "raw"
        if problem == "multi_label_classification":
            return "sigmoid"
        return "prob"

    def _resolve_format(self) -> str:
        if self.spec.format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise PrefalignError(
                f"reward model {self.spec.source!r}: format=chat, but its tokenizer has no chat template; "
                "use format=hh or format=answer",
                field="judge",
            )
        if self.spec.format != "auto":
            return self.spec.format
        if getattr(self.tokenizer, "chat_template", None):
            return "chat"
        return "answer" if self.mode == "prob" else "hh"

    @property
    def name(self) -> str:
        """Stable judge name: ``rm:SOURCE[@LABEL]`` plus options that change scores."""
        out = "rm:" + self.spec.source.rstrip("/")
        if self.head is not None:
            label = self.labels[self.head]
            out += f"@{self.head}" if _GENERIC_LABEL.fullmatch(label) else f"@{label}"
        extras = []
        if self.spec.format != "auto":
            extras.append(f"format={self.format}")
        if self.spec.mode != "auto":
            extras.append(f"mode={self.mode}")
        if not self.spec.preference:
            extras.append("pref=no")
        if self.spec.max_length is not None:
            extras.append(f"max_length={self.max_length}")
        return ",".join([out, *extras])

    def describe(self) -> dict[str, Any]:
        """What this judge computes, for config.json and reports."""
        return {
            "kind": "rm",
            "spec": self.spec.spec,
            "head": None if self.head is None else {"index": self.head, "label": self.labels[self.head]},
            "mode": self.mode,
            "format": self.format,
            "preference_in_prompt": self.spec.preference,
            "max_length": self.max_length,
            "only": list(self.spec.only),
            "trust_remote_code": self.trust_remote_code,
            "units": {"raw": "reward (model units)", "prob": "probability", "sigmoid": "probability"}[self.mode],
        }

    def applies_to(self, preference: str) -> bool:
        """Whether rows of ``preference`` are judged (the spec's ``only=``)."""
        return preference_selected(preference, self.spec.only)

    # --- inputs and scoring ---------------------------------------------------------------

    def user_turn(self, prompt: str, preference_text: str | None) -> str:
        """The user turn the judge sees: the prompt, then (``pref=yes``) a space and the preference."""
        if self.spec.preference and preference_text:
            return f"{prompt} {preference_text}"
        return prompt

    def encode(self, prompt: str, answer: str, preference_text: str | None = None) -> list[int]:
        """Token ids of one input, laid out in the judge's format (before truncation)."""
        tok = self.tokenizer
        user = self.user_turn(prompt, preference_text)
        if self.format == "chat":
            text = tok.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                tokenize=False,
            )
            # The template already holds the special tokens (BOS); adding them again would
            # double BOS for Llama-3 (the Amulet script did).
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if self.format == "hh":
            return list(tok(HH_LAYOUT.format(prompt=user), answer)["input_ids"])
        return list(tok(answer)["input_ids"])

    def _select(self, output: Any) -> Any:
        import torch

        rewards = getattr(output, "rewards", None)
        if self.head is None:
            score = getattr(output, "score", None)
            values = score if score is not None else output.logits
            return values.reshape(values.shape[0], -1)[:, 0].float()
        if rewards is not None:  # ArmoRM: per-objective rewards
            return rewards[:, self.head].float()
        logits = output.logits.float()
        if self.mode == "prob":
            return torch.softmax(logits, dim=-1)[:, self.head]
        if self.mode == "sigmoid":
            return torch.sigmoid(logits[:, self.head])
        return logits[:, self.head]

    def score_ids(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Scores of already-encoded inputs, one forward per batch (right padding)."""
        import torch

        order = sorted(range(len(batch_ids)), key=lambda i: len(batch_ids[i]))  # less padding
        out: list[float] = [0.0] * len(batch_ids)
        pad = int(self.model.config.pad_token_id)
        device = next(self.model.parameters()).device
        bs = self.spec.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                seqs = [list(batch_ids[i])[: self.max_length] for i in idx]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for row, s in enumerate(seqs):
                    ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                    mask[row, : len(s)] = 1
                # Right padding keeps every row's positions 0..n-1 (the heads pool at the
                # last non-pad token), so a batched score equals an unbatched forward's.
                values = self._select(self.model(input_ids=ids.to(device), attention_mask=mask.to(device)))
                for i, v in zip(idx, values.tolist()):
                    out[i] = float(v)
        return out

    def score_many(self, items: Sequence[tuple[str, str, str | None]]) -> list[float]:
        """Score ``(prompt, answer, preference_text)`` triples; higher is better."""
        encoded = [self.encode(p, a, t) for p, a, t in items]
        self.truncated += sum(1 for e in encoded if len(e) > self.max_length)
        if not encoded:
            return []
        return self.score_ids(encoded)

    def __repr__(self) -> str:
        return f"RewardModelJudge({self.name!r})"

