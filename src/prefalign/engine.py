"""The decoding engine: B prompts × K contexts per step, in one batched forward per model.

Every method, the CLI, the server and the evaluation decode through :class:`Engine`.

One token's path (see docs/architecture.md):

1. A :class:`GenerationRequest` brings the token ids of each context its method needs
   (base, preference, ...) and which model reads each (the policy, or a reward model).
2. New requests are *prefilled*: their contexts, left-padded together, run through
   the model once with a fresh KV cache (position ids from the attention mask, so
   padding never shifts positions); the new rows are then merged into the running
   cache, left-padding whichever side is shorter.
3. Each step feeds every running row its last token (one forward per model over all
   rows), takes the last position's log-softmax, and gathers per request a
   ``[tracks, K, V]`` block that the method's ``combine`` turns into ``[tracks, V]``
   scores. Requests sharing a method and weights are combined in one call.
4. Scores become tokens: argmax, sampling after temperature/top-k/top-p (transformers'
   logits warpers) with a per-request generator, or a beam-search update.
5. The chosen token is appended to all K contexts of its track; EOS, stop strings and
   ``max_new_tokens`` end a request; finished rows leave the batch and beam tracks are
   reordered — both by one row selection on the caches and masks.

Requests can join and leave between steps (continuous batching): :meth:`Engine.add`,
:meth:`Engine.cancel`, :meth:`Engine.step`.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .compat import cache_kwargs
from .errors import PrefalignError
from .methods import POLICY, Method

_NEG_INF = float("-inf")


# --- Public data types -------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How scores become tokens. ``temperature=0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t != t or t < 0 or math.isinf(t):
            raise PrefalignError(f"temperature must be a finite number ≥ 0, got {t!r}", field="temperature")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise PrefalignError(f"top_p must be in (0, 1], got {p!r}", field="top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise PrefalignError(f"top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}", field="top_k")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise PrefalignError(f"seed must be an integer, got {self.seed!r}", field="seed")

    @property
    def greedy(self) -> bool:
        # Below 1e-5, scores / T overflow to inf and sampling is argmax anyway.
        return self.temperature < 1e-5


@dataclass
class GenerationRequest:
    """One prompt to answer: its contexts (in the method's role order) and how to decode."""

    contexts: list[tuple[str, list[int]]]
    method: Method
    weights: tuple[float, ...] = (1.0,)
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Index of the context whose prompt the answer continues (usage's prompt_tokens).
    primary: int = -1


@dataclass
class Usage:
    """Token and compute counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    context_tokens: int = 0
    forward_passes: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "context_tokens": self.context_tokens,
            "forward_passes": self.forward_passes,
        }


@dataclass
class Delta:
    """What one step added to one request's answer (streaming unit)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """A finished answer.

    ``finish_reason``: ``"stop"`` (EOS or a stop string), ``"length"`` (``max_new_tokens``)
    or ``"error"`` (the method ruled out every token, e.g. all scores −inf/NaN).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    seconds: float = 0.0


# --- Internal state ----------------------------------------------------------------


@dataclass
class _Track:
    """One hypothesis of a request (beam search keeps several)."""

    tokens: list[int] = field(default_factory=list)
    score: float = 0.0
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    parent: int | None = None  # beam search: the track this one continues, until rows are reordered


@dataclass
class _Active:
    request: GenerationRequest
    tracks: list[_Track]
    usage: Usage
    generator: torch.Generator | None
    started: float
    finished: list[tuple[float, list[int]]] = field(default_factory=list)  # beam: (normalised score, tokens)
    finish_reason: str | None = None
    max_stop_len: int = 0


@dataclass
class _ModelState:
    """Running rows of one model: its KV cache, attention mask and the next token to feed."""

    cache: Any = None
    mask: torch.Tensor | None = None  # [R, L] long
    next_tokens: torch.Tensor | None = None  # [R]
    rows: list[tuple[_Active, int, int]] = field(default_factory=list)  # (request, track, context)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into ``(input_ids, attention_mask)``, both ``[n, longest]``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, length - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded prefill: real tokens count from 0, padding never shifts them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise PrefalignError(
            f"the model's cache ({type(cache).__name__}) has no per-layer keys/values; prefalign's engine "
            "needs a transformers DynamicCache-style cache to batch and reorder rows"
        )
    return layers


def _pad_cache_left(cache: Any, pad: int) -> None:
    if pad <= 0:
        return
    for layer in _cache_layers(cache):
        layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
        layer.values = F.pad(layer.values, (0, 0, pad, 0))


def _concat_caches(first: Any, second: Any) -> None:
    """Append ``second``'s rows to ``first`` (same sequence length)."""
    for a, b in zip(_cache_layers(first), _cache_layers(second)):
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)


def _drop_cache_prefix(cache: Any, n: int) -> None:
    for layer in _cache_layers(cache):
        layer.keys = layer.keys[:, :, n:]
        layer.values = layer.values[:, :, n:]


def _check_cache_length(cache: Any, length: int) -> None:
    for layer in _cache_layers(cache):
        if layer.keys.shape[-2] != length:
            raise PrefalignError(
                "a cache layer dropped tokens (sliding-window attention past its window); "
                "prefalign's engine supports sequences within the window only"
            )


# --- The engine --------------------------------------------------------------------


class Engine:
    """Batched, KV-cached multi-context decoding over one or more models.

    ``models`` maps keys to causal LMs: ``"policy"`` is required; methods such as PAD
    add a reward model under their own key. All models share ``tokenizer``.
    """

    def __init__(self, models: Mapping[str, Any] | Any, tokenizer: Any, *, eos_token_ids: Sequence[int] | None = None):
        self.models: dict[str, Any] = dict(models) if isinstance(models, Mapping) else {POLICY: models}
        if POLICY not in self.models:
            raise PrefalignError("the engine needs a 'policy' model")
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(self.models[POLICY], tokenizer))
        self._pending: list[GenerationRequest] = []
        self._active: dict[str, _Active] = {}
        self._states: dict[str, _ModelState] = {}
        self._results: dict[str, GenerationResult] = {}
        self._cancelled: set[str] = set()
        self.steps = 0

    # -- queue ----------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> str:
        """Queue a request; it joins the running batch at the next :meth:`step`."""
        self.validate(request)
        self._pending.append(request)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Drop a request (queued or running); its rows leave the batch at the next step."""
        self._pending = [r for r in self._pending if r.request_id != request_id]
        if request_id in self._active:
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._active)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def pop_result(self, request_id: str) -> GenerationResult | None:
        """The finished result of a request (once), or None if not finished."""
        return self._results.pop(request_id, None)

    def reset(self) -> None:
        """Forget every queued, running and finished request (e.g. after a failed step)."""
        self._pending, self._active, self._states = [], {}, {}
        self._results, self._cancelled = {}, set()

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`PrefalignError` if the engine cannot run ``request`` as given."""
        roles = request.method.roles(len(request.weights))
        if len(roles) != len(request.contexts):
            raise PrefalignError(f"method {request.method.name!r} needs {len(roles)} contexts, got {len(request.contexts)}")
        for role, (model_key, ids) in zip(roles, request.contexts):
            if model_key not in self.models:
                raise PrefalignError(
                    f"method {request.method.name!r} needs model {model_key!r}, which this engine does not have",
                    field="method",
                )
            if role.model != model_key:
                raise PrefalignError(f"context for role {role} given to model {model_key!r}")
            if not ids:
                raise PrefalignError("a context has no tokens", field="prompt")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise PrefalignError(
                f"max_new_tokens must be an integer ≥ 1, got {request.max_new_tokens!r}", field="max_new_tokens"
            )
        if any(w <= 0 for w in request.weights):
            raise PrefalignError("preference weights must be > 0", field="preference")
        if request.method.beam_width > 1 and not request.sampling.greedy:
            raise PrefalignError("beam search is deterministic; use temperature 0 with method 'beam'", field="temperature")

    # -- driving --------------------------------------------------------------------

    def run(self, requests: Sequence[GenerationRequest]) -> Iterator[Delta]:
        """Add ``requests`` and step until all of them finish, yielding deltas."""
        for request in requests:
            self.add(request)
        wanted = {r.request_id for r in requests}
        while wanted & (set(self._active) | {r.request_id for r in self._pending}):
            yield from self.step()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` to completion; results in the order given."""
        for _ in self.run(requests):
            pass
        return [self._results.pop(r.request_id) for r in requests]

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Prefill queued requests, advance every running request by one token."""
        deltas: list[Delta] = []
        for request_id in self._cancelled:
            if request_id in self._active:
                self._active[request_id].finish_reason = "cancelled"
        self._cancelled.clear()
        self._reorder_rows()
        joining = [self._start(r) for r in self._pending]
        self._pending = []
        if not self._active:
            return deltas
        logprobs: dict[str, torch.Tensor] = {}
        models = dict(self.models)  # a model added meanwhile (another thread) joins at the next step
        owner = self._pass_owners(models)
        for key, model in models.items():
            if owner[key] != key:
                continue  # another model computes this key's rows in its own pass
            parts = []
            state = self._states.get(key)
            if state is not None and state.rows:
                parts.append(self._decode_forward(key, model, state))
            new_rows = [(a, 0, k) for a in joining for k, (m, _) in enumerate(a.request.contexts) if owner.get(m) == key]
            if new_rows:
                parts.append(self._prefill(key, model, new_rows))
            if parts:
                logprobs[key] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        self.steps += 1
        row_index = {key: {(id(a), t, k): i for i, (a, t, k) in enumerate(s.rows)} for key, s in self._states.items()}
        for key, pass_key in owner.items():
            if pass_key != key and pass_key in logprobs:
                logprobs[key], row_index[key] = logprobs[pass_key], row_index[pass_key]
        for active in self._active.values():
            active.usage.forward_passes += len({owner.get(m, m) for m, _ in active.request.contexts})
        self._choose_tokens(logprobs, row_index, deltas)
        self._reorder_rows()
        return deltas

    # -- model passes ---------------------------------------------------------------

    def _start(self, request: GenerationRequest) -> _Active:
        n_ctx = len(request.contexts)
        primary = request.primary if request.primary >= 0 else n_ctx - 1
        usage = Usage(
            prompt_tokens=len(request.contexts[primary][1]),
            context_tokens=sum(len(ids) for _, ids in request.contexts),
        )
        generator = None
        if request.sampling.seed is not None:
            generator = torch.Generator(device=self._device(POLICY)).manual_seed(request.sampling.seed)
        active = _Active(
            request=request,
            tracks=[_Track()],
            usage=usage,
            generator=generator,
            started=time.perf_counter(),
            max_stop_len=max((len(s) for s in request.stop), default=0),
        )
        self._active[request.request_id] = active
        return active

    def _device(self, key: str) -> torch.device:
        return next(self.models[key].parameters()).device

    def _pass_owners(self, models: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Which model computes each key's rows: itself, or a model whose ``serves`` names it.

        A model with a ``serves`` attribute (a tuple of keys, e.g. PAD's fused policy+PRM
        module, :mod:`prefalign.pad_fused`) runs the rows of all those keys in one
        forward, told each row's key by ``route`` (indices into ``serves``). It takes
        over a key only while that key has no running rows of its own, so a model
        added while requests run never splits a key's rows across two caches.
        """
        models = dict(self.models) if models is None else models
        owner = {key: key for key in models}
        for key, model in models.items():
            for served in getattr(model, "serves", None) or ():
                own = self._states.get(served)
                if served in owner and served != key and (own is None or not own.rows):
                    owner[served] = key
        return owner

    def _forward(self, model: Any, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, rows: list[tuple[_Active, int, int]] | None = None) -> torch.Tensor:
        extra = {}
        serves = getattr(model, "serves", None)
        if serves and rows is not None:
            extra["route"] = torch.tensor([serves.index(a.request.contexts[k][0]) for a, _, k in rows], device=mask.device)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
            **extra,
        )
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def _prefill(self, key: str, model: Any, rows: list[tuple[_Active, int, int]]) -> torch.Tensor:
        from transformers import DynamicCache

        seqs = [a.request.contexts[k][1] for a, _, k in rows]
        ids, mask = left_pad(seqs, self.tokenizer.pad_token_id or 0, self._device(key))
        positions = positions_from_mask(mask)
        cache = DynamicCache(config=getattr(model, "config", None))
        logprobs = self._forward(model, ids, mask, positions, cache, rows)
        self._merge(key, cache, mask, rows)
        return logprobs

    def _decode_forward(self, key: str, model: Any, state: _ModelState) -> torch.Tensor:
        assert state.mask is not None and state.next_tokens is not None
        positions = state.mask.sum(-1, keepdim=True)
        state.mask = F.pad(state.mask, (0, 1), value=1)
        logprobs = self._forward(model, state.next_tokens[:, None], state.mask, positions, state.cache, state.rows)
        _check_cache_length(state.cache, state.mask.shape[1])
        return logprobs

    def _merge(self, key: str, cache: Any, mask: torch.Tensor, rows: list[tuple[_Active, int, int]]) -> None:
        """Append freshly prefilled rows to the running rows of model ``key``."""
        state = self._states.get(key)
        placeholder = torch.zeros(len(rows), dtype=torch.long, device=mask.device)
        if state is None or not state.rows:
            self._states[key] = _ModelState(cache=cache, mask=mask, next_tokens=placeholder, rows=list(rows))
            return
        assert state.mask is not None and state.next_tokens is not None
        old_len, new_len = state.mask.shape[1], mask.shape[1]
        _pad_cache_left(state.cache, new_len - old_len)
        _pad_cache_left(cache, old_len - new_len)
        length = max(old_len, new_len)
        state.mask = torch.cat([F.pad(state.mask, (length - old_len, 0)), F.pad(mask, (length - new_len, 0))])
        _concat_caches(state.cache, cache)
        state.next_tokens = torch.cat([state.next_tokens, placeholder])
        state.rows.extend(rows)

    # -- token choice ---------------------------------------------------------------

    def _choose_tokens(
        self,
        logprobs: dict[str, torch.Tensor],
        row_index: dict[str, dict[tuple[int, int, int], int]],
        deltas: list[Delta],
    ) -> None:
        groups: dict[tuple[Method, tuple[float, ...]], list[_Active]] = {}
        for active in self._active.values():
            groups.setdefault((active.request.method, active.request.weights), []).append(active)
        for (method, weights), members in groups.items():
            models = [m for m, _ in members[0].request.contexts]
            blocks = []
            for k, model_key in enumerate(models):
                idx = [row_index[model_key][(id(a), t, k)] for a in members for t in range(len(a.tracks))]
                blocks.append(logprobs[model_key][torch.tensor(idx, device=logprobs[model_key].device)])
            stacked = torch.stack(blocks, dim=1)  # [tracks of all members, K, V]
            scores = method.combine(stacked, torch.tensor(weights, dtype=stacked.dtype, device=stacked.device))
            # NaN (e.g. −inf − −inf where both contexts rule a token out) means "ruled out".
            scores = scores.masked_fill(scores.isnan(), _NEG_INF)
            usable = torch.isfinite(scores).any(dim=-1).tolist()
            if not all(usable):
                members = self._fail_unusable(members, usable, deltas)
                if not members:
                    continue
                scores = scores[torch.tensor(usable)]
            offset = 0
            if method.beam_width == 1 and all(a.request.sampling.greedy for a in members):
                chosen = scores.argmax(dim=-1).tolist()
                for a in members:
                    self._advance(a, 0, chosen[offset], deltas)
                    offset += 1
                continue
            for a in members:
                n = len(a.tracks)
                block = scores[offset:offset + n]
                offset += n
                if method.beam_width > 1:
                    self._beam_update(a, block, method, deltas)
                else:
                    self._advance(a, 0, self._sample(a, block[0]), deltas)

    def _fail_unusable(self, members: list[_Active], usable: list[bool], deltas: list[Delta]) -> list[_Active]:
        """Finish (reason "error") the requests with a track whose scores are all −inf/NaN."""
        keep, offset = [], 0
        for active in members:
            n = len(active.tracks)
            if all(usable[offset:offset + n]):
                keep.append(active)
            else:
                self._finish(active, "error", deltas, active.tracks[0], new_tokens=[])
                for i in range(offset, offset + n):
                    usable[i] = False
            offset += n
        return keep

    def _sample(self, active: _Active, scores: torch.Tensor) -> int:
        params = active.request.sampling
        if params.greedy:
            return int(scores.argmax())
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        scores = scores[None, :]
        scores = TemperatureLogitsWarper(params.temperature)(None, scores)
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=active.generator)[0, 0])

    def _advance(self, active: _Active, track_index: int, token: int, deltas: list[Delta]) -> None:
        """Append ``token`` to a track and decide whether the request finished."""
        request, track = active.request, active.tracks[track_index]
        if token in self.eos_token_ids and not request.ignore_eos:
            self._finish(active, "stop", deltas, track, new_tokens=[])
            return
        track.tokens.append(token)
        active.usage.completion_tokens = len(track.tokens)
        reason = None
        previous = len(track.text)
        track.text = self.tokenizer.decode(track.tokens, skip_special_tokens=True)
        if request.stop:
            start = max(0, previous - active.max_stop_len)
            hits = [(i, s) for s in request.stop if (i := track.text.find(s, start)) >= 0]
            if hits:
                track.text = track.text[: min(i for i, _ in hits)]
                reason = "stop"
        if reason is None and len(track.tokens) >= request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(active, reason, deltas, track, new_tokens=[token])
        else:
            self._emit(active, track, [token], deltas, final=False)

    def _emit(self, active: _Active, track: _Track, tokens: list[int], deltas: list[Delta], *, final: bool, reason: str | None = None) -> None:
        """Stream the part of ``track.text`` (kept decoded by the caller) that is safe to show."""
        safe = len(track.text)
        if not final:
            # Hold back an incomplete UTF-8 character and anything that may begin a stop string.
            while safe > track.emitted and track.text[safe - 1] == "\ufffd":
                safe -= 1
            safe = max(track.emitted, safe - max(0, active.max_stop_len - 1))
        text = track.text[track.emitted:safe]
        track.emitted = safe
        if text or tokens or final:
            deltas.append(Delta(active.request.request_id, text, tokens, reason))

    def _finish(self, active: _Active, reason: str, deltas: list[Delta], track: _Track, new_tokens: list[int]) -> None:
        """Record the result, stream what is left of the text; rows leave at the next reorder."""
        if reason == "length":
            # Cut off mid-character: drop the replacement char(s) of the incomplete UTF-8 tail.
            track.text = track.text.rstrip("\ufffd")
        active.finish_reason = reason
        active.usage.completion_tokens = len(track.tokens)
        active.tracks = [track]
        self._emit(active, track, new_tokens, deltas, final=True, reason=reason)
        self._results[active.request.request_id] = GenerationResult(
            request_id=active.request.request_id,
            text=track.text,
            token_ids=list(track.tokens),
            finish_reason=reason,
            usage=active.usage,
            seconds=time.perf_counter() - active.started,
        )

    # -- beam search ----------------------------------------------------------------

    def _beam_update(self, active: _Active, scores: torch.Tensor, method: Method, deltas: list[Delta]) -> None:
        """One step of transformers-style beam search (early_stopping=True) for one request."""
        width = method.beam_width
        length_penalty = float(getattr(method, "length_penalty", 1.0))
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        vocab = logprobs.shape[-1]
        running = torch.tensor([t.score for t in active.tracks], dtype=logprobs.dtype)
        total = (logprobs + running[:, None]).reshape(-1)
        # As transformers: (EOS ids + 1) × width candidates, so `width` non-finished ones remain.
        top_scores, top_ids = torch.topk(total, k=min((len(self.eos_token_ids) + 1) * width, total.numel()))
        generated = len(active.tracks[0].tokens) + 1
        max_new = active.request.max_new_tokens
        new_tracks: list[_Track] = []
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            parent, token = divmod(flat, vocab)
            is_eos = token in self.eos_token_ids and not active.request.ignore_eos
            if is_eos or generated >= max_new:
                # Only the best `width` candidates may finish (the rest are spares to keep
                # `width` beams running), scored by length-normalised log-prob.
                if rank < width:
                    tokens = active.tracks[parent].tokens + ([] if is_eos else [token])
                    active.finished.append((score / generated**length_penalty, tokens))
                continue
            if len(new_tracks) < width:
                new_tracks.append(_Track(tokens=active.tracks[parent].tokens + [token], score=score, parent=parent))
        active.finished.sort(key=lambda item: -item[0])
        del active.finished[width:]
        active.usage.completion_tokens = generated
        if len(active.finished) >= width or not new_tracks:
            best_score, best_tokens = active.finished[0]
            best = _Track(tokens=best_tokens, score=best_score, text=self.tokenizer.decode(best_tokens, skip_special_tokens=True))
            self._finish(active, "length" if len(best_tokens) >= max_new else "stop", deltas, best, new_tokens=best_tokens)
            return
        active.tracks = new_tracks

    # -- row bookkeeping --------------------------------------------------------------

    def _reorder_rows(self) -> None:
        """Remove finished requests' rows and follow beam reordering, in every model's cache."""
        for rid in [rid for rid, a in self._active.items() if a.finish_reason is not None]:
            del self._active[rid]
        owner = self._pass_owners()
        for key, state in list(self._states.items()):
            if not state.rows:
                continue
            old_index = {(id(a), t, k): i for i, (a, t, k) in enumerate(state.rows)}
            keep: list[int] = []
            rows: list[tuple[_Active, int, int]] = []
            tokens: list[int] = []
            for active in self._active.values():
                contexts = [k for k, (m, _) in enumerate(active.request.contexts) if owner.get(m, m) == key]
                for t, track in enumerate(active.tracks):
                    parent = t if track.parent is None else track.parent
                    for k in contexts:
                        source = old_index.get((id(active), parent, k))
                        if source is None:
                            continue
                        keep.append(source)
                        rows.append((active, t, k))
                        tokens.append(track.tokens[-1] if track.tokens else 0)
            if not rows:
                self._states[key] = _ModelState()
                continue
            assert state.mask is not None
            device = state.mask.device
            index = torch.tensor(keep, dtype=torch.long, device=device)
            if keep != list(range(len(state.rows))):
                state.cache.batch_select_indices(index)
                state.mask = state.mask[index]
            state.rows = rows
            state.next_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
            # Columns that are padding for every remaining row cost compute: drop them.
            used = state.mask.any(dim=0).nonzero()
            first = int(used[0]) if used.numel() else 0
            if first > 0:
                _drop_cache_prefix(state.cache, first)
                state.mask = state.mask[:, first:]
        for active in self._active.values():
            for track in active.tracks:
                track.parent = None


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


__all__ = [
    "Delta",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "Usage",
]
