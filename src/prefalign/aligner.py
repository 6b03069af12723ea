"""The Python API: :class:`Aligner` turns prompts and preferences into aligned answers."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Engine, GenerationRequest, GenerationResult, SamplingParams, TokenLogprob, Usage
from .errors import ContextLengthError, PrefalignError
from .methods import POLICY, PRM, Method, make_method
from .models import load_model, prepare_tokenizer
from .prompts import Chat, Preference, PromptLike, encode_context, parse_preferences, to_chat
from .rules import BACKENDS, PAD_BACKEND_MESSAGE, check_backend, check_prm_given
from .spec import RequestSpec

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "PAD_BACKEND_MESSAGE", "Aligner", "StreamEvent"]  # BACKENDS and PAD_BACKEND_MESSAGE: from rules.py


@dataclass
class StreamEvent:
    """A piece of a streamed answer. ``index`` is the prompt's position in the call."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    #: Why the request failed, when ``finish_reason == "error"``.
    error: str | None = None
    #: Per token of ``token_ids`` when ``logprobs=True`` was asked (else None).
    logprobs: list[TokenLogprob] | None = None
    #: Which of the prompt's ``n`` answers this piece belongs to.
    choice: int = 0


def _is_single_prompt(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return True
    # A chat is a list of {role, content} dicts; a batch is a list of strings or chats.
    return isinstance(prompts, Sequence) and bool(prompts) and isinstance(prompts[0], dict)


class Aligner:
    """Decode a causal LM aligned to user preferences.

    >>> al = Aligner.from_pretrained()                      # embedded SmolLM2-135M
    >>> out = al.generate(["How do I boil an egg?"], preference="concise", method="amulet")
    >>> out[0].text, out[0].finish_reason, out[0].usage.completion_tokens
    """

    def __init__(self, model: Any, tokenizer: Any, *, reward_models: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.engine = Engine({POLICY: model, **(reward_models or {})}, self.tokenizer)
        self.fast_path: Any = None
        #: The template the loaded PRM was trained in (its prm_config.json), if known.
        self.prm_template: str | None = None

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: torch.dtype | str | None = None,
        fast: bool | str = "auto",
        threads: int | None = None,
        prm: Any = None,
        backend: str = "transformers",
    ) -> Aligner:
        """Load a model (default: the embedded SmolLM2-135M-Instruct) and wrap it.

        ``backend="transformers"`` (default) runs the model in PyTorch; ``"llamacpp"`` runs
        a GGUF file (the embedded model, a ``.gguf`` path or a directory holding one) in
        llama.cpp's quantized kernels (``pip install 'prefalign[llamacpp]'``; every method
        but ``pad``). On transformers:
        ``fast="auto"`` runs linear layers through prepacked oneDNN kernels (fp32) on CPUs
        that support them, keeping greedy tokens identical; ``True`` insists on it (error
        if unavailable); ``"bf16"`` packs weights in bf16 — faster, but it changes greedy
        tokens at near-ties (5 of 8 benchmark prompts), so it is opt-in; ``False`` keeps
        plain PyTorch.
        ``device``: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda"``;
        ``dtype``: None/``"auto"`` is bfloat16 on CUDA and float32 on the CPU.
        ``threads`` sets torch's intra-op threads (and llama.cpp's; None: leave as is).
        ``prm``: a personalised reward model directory for method ``pad`` (``"default"``:
        the PRM shipped for the embedded model); None loads it lazily on first use.
        """
        check_backend(backend)
        if fast not in (True, False, "auto", "fp32", "bf16"):
            raise PrefalignError(f"fast must be true, false, 'auto', 'fp32' or 'bf16', got {fast!r}", field="fast")
        if backend == "transformers":  # checked before anything loads
            from .models import resolve_device, resolve_dtype

            device = resolve_device(device)
            dtype = resolve_dtype(dtype, device)
        if threads is not None:
            torch.set_num_threads(int(threads))
        if backend == "llamacpp":
            if prm is not None:
                raise PrefalignError(PAD_BACKEND_MESSAGE, field="prm")
            from .runners.llamacpp import gguf_path_for, load_llamacpp

            lm, tokenizer = load_llamacpp(gguf_path_for(model), threads=threads)
            return cls(lm, tokenizer)
        lm, tokenizer = load_model(model, device=device, dtype=dtype)
        aligner = cls(lm, tokenizer)
        if prm is not None:  # before the fast path, so the PRM is built from plain layers
            aligner.load_prm(None if str(prm) == "default" else prm)
        if fast:
            aligner.fast_path = _apply_fast_path(lm, fast)
            reward_model = aligner.engine.models.get(PRM)
            if reward_model is not None and reward_model is not lm and not getattr(reward_model, "serves", None):
                _apply_fast_path(reward_model, "auto")
        return aligner

    @property
    def backend(self) -> str:
        """``"transformers"`` or ``"llamacpp"``: what runs the policy model."""
        return getattr(self.model, "backend", "transformers")

    def add_model(self, key: str, model: Any) -> None:
        """Make another model (e.g. a personalised reward model) available to methods."""
        self.engine.add_model(key, model)

    def load_prm(self, path: Any = None, *, fused: bool = True) -> Any:
        """Load a personalised reward model for method ``pad`` and add it as ``"prm"``.

        ``path``: a PRM directory (``prefalign train-prm`` writes one); None: the PRM
        shipped for the embedded model (other policies need a path). ``fused`` (default)
        runs the policy's and the PRM's rows in one forward per step (the PRM's LoRA
        adapters applied to its rows only, :mod:`prefalign.pad_fused`); False runs the
        PRM, adapters merged, as a second model (two forwards per step). Raises a
        :class:`PrefalignError` naming what to do when there is none, and
        ``TokenizerMismatchError`` when the PRM was trained for another tokenizer.
        """
        if self.backend != "transformers":
            raise PrefalignError(PAD_BACKEND_MESSAGE, field="method")
        name = getattr(self.model.config, "name_or_path", None) or type(self.model).__name__
        check_prm_given(name, path)
        try:
            from . import prm as prm_api
        except ImportError as exc:
            raise PrefalignError(
                f"PRM support cannot be imported ({exc}), and method 'pad' needs it; "
                "install it with `pip install 'prefalign[prm]'`",
                field="prm",
            ) from exc
        if path is None:
            try:
                path = prm_api.default_prm_path()
            except Exception as exc:
                raise PrefalignError(
                    f"the personalised reward model (PRM) shipped for the embedded model, which method 'pad' needs, "
                    f"is not available ({exc}); pass one with prm=PATH / `--prm PATH` "
                    "or train one with `prefalign train-prm`",
                    field="prm",
                ) from exc
        reward_model = prm_api.load_prm(path, self.model, self.tokenizer, merge=not fused)
        template = reward_model.prm_config.get("template")
        if fused:
            # One forward per step over the policy's and the PRM's rows (benchmarks/pad_speed.py).
            from .pad_fused import FusedPadModel

            reward_model = FusedPadModel(self.model, reward_model)
        elif getattr(self.fast_path, "active", False):
            _apply_fast_path(reward_model, "auto")
        self.add_model(PRM, reward_model)
        self.prm_template = template
        return reward_model

    def template_for(self, method: str | Method) -> str:
        """The template a request for ``method`` uses when none is given.

        A method scored by the PRM reads the preference through the template the PRM was
        trained in (``prm_config.json``'s ``template``; loading the PRM if needed), since
        its rewards mean nothing under another prompt; other methods use their own default.
        """
        rule = make_method(method) if isinstance(method, str) else method
        if PRM in rule.extra_models:
            if PRM not in self.engine.models:
                self.load_prm()
            return self.prm_template or rule.default_template
        return rule.default_template

    # -- requests -----------------------------------------------------------------------

    @property
    def context_window(self) -> int | None:
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def build_request(
        self,
        prompt: PromptLike,
        preference: Any = None,
        method: str | Method | None = None,
        *,
        sampling: SamplingParams | None = None,
        template: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        n: int | None = None,
        **method_params: Any,
    ) -> GenerationRequest:
        """Validate one prompt's arguments and render its contexts into an engine request.

        Decoding settings come as a :class:`SamplingParams` (``sampling``) or as its field
        names (``max_new_tokens``, ``temperature``, ...), which override ``sampling``'s;
        the remaining keywords are the method's parameters. ``max_new_tokens=None`` with
        no ``sampling``: 128. The same as ``prepare(RequestSpec.build(...), prompt)``:
        the spec checks what needs no model, :meth:`prepare` the rest.
        ``method=None``: ``pref`` with a preference, ``base`` without (:func:`prefalign.rules.choose_method`).
        A request for ``n`` > 1 answers is run as ``request.split_choices()``.
        """
        spec = RequestSpec.build(
            method, preference, template=template, sampling=sampling,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, ignore_eos=ignore_eos, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, logprobs=logprobs, top_logprobs=top_logprobs, n=n,
            **method_params,
        )
        return self.prepare(spec, prompt)

    def prepare(self, spec: RequestSpec, prompt: PromptLike, *, fit_window: bool = False) -> GenerationRequest:
        """The engine request for ``spec`` on ``prompt``: the checks that need the model, once.

        Renders the contexts (the template: ``spec.template`` or :meth:`template_for`),
        loads the PRM a method reads if it is not loaded (or says how to get one; not on
        llama.cpp), and checks the prompt and ``max_new_tokens`` against the context
        window. ``fit_window=True`` lowers ``max_new_tokens`` to the room the window
        leaves instead of refusing it (the server's unset ``max_tokens``).
        """
        rule = spec.method
        preferences = list(spec.preferences)
        if not rule.needs_preference:
            preferences = preferences[:1]  # base ignores it; keep one so role indices stay valid
        chat = to_chat(prompt)
        template = spec.template or self.template_for(rule)
        contexts = self._contexts(chat, preferences, rule, template)
        decoding = spec.sampling
        window = self.context_window
        longest = max(len(ids) for _, ids in contexts)
        if window and longest >= window:
            # No room for even one new token: the prompt itself is the problem, not max_new_tokens.
            raise ContextLengthError(
                f"the prompt is {longest} tokens (its longest context, with the chat template); the model's "
                f"context window is {window} tokens, which leaves no room for an answer: shorten the prompt "
                f"to fewer than {window} tokens",
                field="prompt",
            )
        if window and longest + decoding.max_new_tokens > window:
            if fit_window:
                decoding = dataclasses.replace(decoding, max_new_tokens=window - longest)
            else:
                raise ContextLengthError(
                    f"prompt ({longest} tokens) + max_new_tokens ({decoding.max_new_tokens}) exceeds the model's context window "
                    f"of {window} tokens; lower max_new_tokens to at most {max(window - longest, 0)} or shorten the prompt",
                    field="max_new_tokens",
                )
        weights = tuple(p.weight for p in preferences) or (1.0,)
        return GenerationRequest(
            contexts=contexts,
            method=rule,
            weights=weights,
            sampling=decoding,
            primary=rule.primary_context(len(weights)),
            template=template,
            preferences=tuple(preferences),
        )

    def encode_context(self, prompt: PromptLike, preference: str | None = None, template: str = "default") -> list[int]:
        """Token ids of one context: ``prompt`` rendered with ``preference`` (None: the base context)."""
        text = parse_preferences(preference)[0].text if preference else None
        return encode_context(self.tokenizer, to_chat(prompt), text, template)

    def _contexts(self, chat: Chat, preferences: list[Preference], rule: Method, template: str) -> list[tuple[str, list[int]]]:
        for key in rule.extra_models:
            if key == PRM and key not in self.engine.models:
                self.load_prm()  # the shipped PRM for the embedded model, or a clear error
            if key not in self.engine.models:
                raise PrefalignError(
                    f"method {rule.name!r} needs a model under {key!r}; load it first (see the method's docs)",
                    field="method",
                )
        contexts = []
        for role in rule.roles(len(preferences)):
            text = None if role.preference is None else preferences[role.preference].text
            contexts.append((role.model, encode_context(self.tokenizer, chat, text, role.template or template)))
        return contexts

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        preference: Any = None,
        method: str | Method | None = None,
        *,
        spec: RequestSpec | None = None,
        **kwargs: Any,
    ) -> list[GenerationResult]:
        """Answer each prompt; returns one :class:`GenerationResult` per prompt, in order.

        ``prompts`` is a string, a chat (list of ``{role, content}``) or a list of these.
        ``preference`` is a preset name, a sentence, or a list of ``(text, weight)``.
        ``method``: a name or a :class:`Method`; None: ``pref`` with a preference, ``base``
        without one (the default of every face, :func:`prefalign.rules.choose_method`).
        ``kwargs``: ``max_new_tokens``, ``template``, ``temperature``, ``top_p``, ``top_k``,
        ``seed``, ``stop``, ``ignore_eos``, the repetition controls (``frequency_penalty``,
        ``presence_penalty``, ``repetition_penalty``, ``no_repeat_ngram_size``; see
        :class:`SamplingParams`), ``logprobs``, ``top_logprobs``, ``n`` and the method's
        parameters (e.g. ``alpha``).

        ``logprobs=True``: each result's ``logprobs`` holds, per token, its log-probability
        under the method's final scores (``top_logprobs``: and the best alternatives).
        ``n`` > 1: n answers per prompt, returned prompt by prompt (``len(prompts) × n``
        results; ``result.choice`` is i); answer i samples with seed ``seed + i``, so it
        equals a single call with that seed, and the n answers share the prompt's prefill.

        ``spec``: a :class:`~prefalign.spec.RequestSpec` built (and checked) beforehand, in
        place of ``preference``, ``method`` and ``kwargs``.
        """
        return self.engine.generate([r for choices in self._requests(prompts, preference, method, spec, kwargs) for r in choices])

    def stream(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        preference: Any = None,
        method: str | Method | None = None,
        *,
        spec: RequestSpec | None = None,
        **kwargs: Any,
    ) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields text deltas as tokens are chosen
        (``event.index``: the prompt; ``event.choice``: which of its ``n`` answers)."""
        requests = self._requests(prompts, preference, method, spec, kwargs)
        return self._stream(requests)

    def _requests(
        self, prompts: Any, preference: Any, method: str | Method | None, spec: RequestSpec | None, kwargs: dict[str, Any]
    ) -> list[list[GenerationRequest]]:
        """Per prompt, its checked requests: one per answer (``n``; no prompts: an error,
        for generate and stream alike). One spec for the call, checked once."""
        batch = [prompts] if _is_single_prompt(prompts) else list(prompts)
        if not batch:
            raise PrefalignError("no prompts given", field="prompt")
        if spec is None:
            spec = RequestSpec.build(method, preference, **kwargs)
        elif preference is not None or method is not None or kwargs:
            raise PrefalignError("give a spec or the request's settings (preference, method, ...), not both", field="spec")
        return [self.prepare(spec, p).split_choices() for p in batch]

    def _stream(self, built: list[list[GenerationRequest]]) -> Iterator[StreamEvent]:
        requests = [r for choices in built for r in choices]
        index = {r.request_id: (i, r.choice) for i, choices in enumerate(built) for r in choices}
        # The session cancels whatever is unfinished when the consumer stops early (break, Ctrl-C).
        with self.engine.session(requests) as session:
            for event in session:
                delta, result = event.delta, event.result
                usage, error = (result.usage, result.error) if result else (None, None)
                prompt, choice = index[delta.request_id]
                yield StreamEvent(prompt, delta.text, delta.token_ids, delta.finish_reason, usage, error, delta.logprobs, choice)


def _apply_fast_path(model: Any, mode: bool | str) -> Any:
    """Apply the CPU fast path; ``mode`` True (required), "auto"/"fp32" (if supported) or "bf16"."""
    from . import fastpath

    report = fastpath.optimize_for_cpu(model, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    if mode in (True, "bf16") and not getattr(report, "active", False):
        raise PrefalignError(f"fast path requested but not available: {report}", field="fast")
    return report
