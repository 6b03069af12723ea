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

Long prompts can be prefilled in chunks (``prefill_chunk`` tokens per model forward
per step), interleaved with the decode steps of running requests, so that one long
prompt does not stop everyone else's stream. A fault while preparing, combining or
sampling one group of requests fails those requests alone (``finish_reason="error"``,
``GenerationResult.error`` says why); every other request continues unchanged.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PrefalignError
from .methods import POLICY, Method
from .runners import ModelRunner, Prefill, runner_for
from .runners.kv_cache import left_pad, positions_from_mask  # noqa: F401 - re-exported: they lived here before runners/

_NEG_INF = float("-inf")
log = logging.getLogger(__name__)


# --- Public data types -------------------------------------------------------------


#: The seeds ``torch.Generator.manual_seed`` accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Below this temperature decoding is greedy: scores / T overflow to inf, and the
#: limit of sampling as T → 0 is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Every per-request decoding setting: how scores become tokens and when to stop.

    ``temperature=0`` (or below 1e-5) means greedy (argmax); ``top_p``/``top_k`` (0 = off)
    cut the sampled distribution; ``seed`` makes sampling reproducible whatever the batch;
    ``max_new_tokens`` caps the answer; ``stop`` strings end it (the text is cut before
    them); ``ignore_eos`` decodes past the end-of-sequence token.

    Every field is checked here, once, with an error naming it; the API, the CLI, the
    server and the evaluation all build this object (method parameters are checked by
    the method objects, in the same way).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PrefalignError(f"max_new_tokens must be an integer ≥ 1, got {n!r}", field="max_new_tokens")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise PrefalignError(f"stop must be a string or a list of strings, got {self.stop!r}", field="stop")
        for text in stop:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise PrefalignError("stop contains text that is not valid Unicode (a lone surrogate?)", field="stop") from None
        object.__setattr__(self, "stop", tuple(x for x in stop if x))
        if not isinstance(self.ignore_eos, bool):
            raise PrefalignError(f"ignore_eos must be true or false, got {self.ignore_eos!r}", field="ignore_eos")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t != t or t < 0 or math.isinf(t):
            raise PrefalignError(f"temperature must be a finite number ≥ 0, got {t!r}", field="temperature")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise PrefalignError(f"top_p must be in (0, 1], got {p!r}", field="top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise PrefalignError(f"top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}", field="top_k")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise PrefalignError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}", field="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class GenerationRequest:
    """One prompt to answer: its contexts (in the method's role order) and how to decode."""

    contexts: list[tuple[str, list[int]]]
    method: Method
    weights: tuple[float, ...] = (1.0,)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Index of the context whose prompt the answer continues (usage's prompt_tokens).
    primary: int = -1
    #: What the contexts were rendered from (set by ``Aligner.build_request``), so that
    #: the server's echo, the CLI's ``--json`` and the evaluation read it, not resolve it again.
    template: str | None = None
    preferences: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        # Preferences parsed by prefalign.prompts are already checked; a request built by
        # hand is checked here, where the weights are held.
        if not self.weights or any(not math.isfinite(w) or w <= 0 for w in self.weights) or not math.isfinite(sum(self.weights)):
            raise PrefalignError("preference weights must be finite numbers > 0 with a finite sum", field="preference")

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.sampling.stop

    @property
    def ignore_eos(self) -> bool:
        return self.sampling.ignore_eos


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
    or ``"error"`` (the request failed: ``error`` says why, e.g. the method ruled out
    every token, or its scores could not be computed).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    seconds: float = 0.0
    error: str | None = None


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
    """Running rows of one model (pass key): who they are, and the runner that holds their KV state."""

    runner: ModelRunner
    rows: list[tuple[_Active, int, int]] = field(default_factory=list)  # (request, track, context)


@dataclass
class _PrefillPart:
    """The rows of one prefill group that one model (pass key) computes."""

    rows: list[tuple[_Active, int, int]]
    prefill: Prefill

    @property
    def finished(self) -> bool:
        return self.prefill.finished

    @property
    def logprobs(self) -> torch.Tensor | None:
        return self.prefill.logprobs

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (a request left while it was being prefilled)."""
        self.rows = [self.rows[i] for i in keep]
        self.prefill.select(keep)


@dataclass
class _PrefillGroup:
    """Requests that joined in the same step, prefilled together (in chunks if configured)."""

    members: list[_Active]
    parts: dict[str, _PrefillPart]  # pass key -> rows it computes

    @property
    def finished(self) -> bool:
        return all(part.finished for part in self.parts.values())


# --- The engine --------------------------------------------------------------------


class Engine:
    """Batched, KV-cached multi-context decoding over one or more models.

    ``models`` maps keys to causal LMs: ``"policy"`` is required; methods such as PAD
    add a reward model under their own key. All models share ``tokenizer``.
    """

    def __init__(
        self,
        models: Mapping[str, Any] | Any,
        tokenizer: Any,
        *,
        eos_token_ids: Sequence[int] | None = None,
        prefill_chunk: int | None = None,
    ):
        self.models: dict[str, Any] = dict(models) if isinstance(models, Mapping) else {POLICY: models}
        if POLICY not in self.models:
            raise PrefalignError("the engine needs a 'policy' model")
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(self.models[POLICY], tokenizer))
        self.prefill_chunk = prefill_chunk
        #: Chunk a prefill even when no request is running (tests of chunking use it).
        self.chunk_idle_prefill = False
        self._pending: list[GenerationRequest] = []
        self._prefilling: list[_PrefillGroup] = []
        self._active: dict[str, _Active] = {}
        self._states: dict[str, _ModelState] = {}
        self._results: dict[str, GenerationResult] = {}
        self._cancelled: set[str] = set()

    @property
    def prefill_chunk(self) -> int | None:
        """Prompt tokens one model forward prefills per step (None: whole prompts at once).

        While requests are running, a prompt longer than this is prefilled over several
        steps, interleaved with their decode steps; with none running it runs whole.
        Changing it takes effect at the next step.
        """
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PrefalignError(f"prefill_chunk must be an integer ≥ 1 (or None: whole prompts), got {value!r}", field="prefill_chunk")
        self._prefill_chunk = value

    def add_model(self, key: str, model: Any) -> None:
        """Make another model (e.g. a reward model) available to methods under ``key``.

        Safe while requests run: the model joins at the next step.
        """
        if key == POLICY:
            raise PrefalignError("the policy model cannot be replaced in a running engine", field="model")
        self.models = {**self.models, key: model}

    # -- queue ----------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> str:
        """Queue a request; it joins the running batch at the next :meth:`step`."""
        self.validate(request)
        self._pending.append(request)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Drop a request (queued, prefilling or running); its rows leave the batch at the next step."""
        self._pending = [r for r in self._pending if r.request_id != request_id]
        if request_id in self._active or self._is_prefilling(request_id):
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._prefilling or self._active)

    def _is_prefilling(self, request_id: str) -> bool:
        return any(a.request.request_id == request_id for g in self._prefilling for a in g.members)

    def _known(self, request_id: str) -> bool:
        """Queued, prefilling or running (not finished, not dropped)."""
        return request_id in self._active or any(r.request_id == request_id for r in self._pending) or self._is_prefilling(request_id)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def pop_result(self, request_id: str) -> GenerationResult | None:
        """The finished result of a request (once), or None if not finished."""
        return self._results.pop(request_id, None)

    def reset(self) -> None:
        """Forget every queued, running and finished request (e.g. after a failed step)."""
        self._pending, self._prefilling, self._active, self._states = [], [], {}, {}
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
        if not isinstance(request.sampling, SamplingParams):
            raise PrefalignError("a request's sampling must be a SamplingParams", field="sampling")
        if request.method.beam_width > 1 and not request.sampling.greedy:
            raise PrefalignError("beam search is deterministic; use temperature 0 with method 'beam'", field="temperature")

    # -- driving --------------------------------------------------------------------

    def run(self, requests: Sequence[GenerationRequest]) -> Iterator[Delta]:
        """Add ``requests`` and step until all of them finish, yielding deltas.

        Every request is validated before any is queued. However the iteration ends (all
        finished, the consumer stopped early, an exception), none of these requests is
        left in the engine: unfinished ones are cancelled and the engine stays usable.
        Results stay available through :meth:`pop_result` until popped.
        """
        for request in requests:
            self.validate(request)
        wanted = [r.request_id for r in requests]
        try:
            for request in requests:
                self._pending.append(request)
            while any(self._known(rid) for rid in wanted):
                yield from self.step()
        finally:
            for rid in wanted:
                if self._known(rid):
                    self.cancel(rid)
            if self._cancelled:
                with torch.inference_mode():
                    self._drop_cancelled()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` to completion; results in the order given."""
        try:
            for _ in self.run(requests):
                pass
            return [self._results.pop(r.request_id) for r in requests]
        finally:
            for r in requests:
                self._results.pop(r.request_id, None)

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Advance every running request by one token and prefill queued ones (a chunk of
        them when ``prefill_chunk`` is set).

        A fault in one group of requests (its prefill, its method's ``combine``, its
        sampling) fails that group alone. A fault in the forward pass that every running
        request shares leaves no request in the engine (it is :meth:`reset`) and is raised.
        """
        deltas: list[Delta] = []
        try:
            self._drop_cancelled()
            models = dict(self.models)  # a model added meanwhile (another thread) joins at the next step
            owner = self._pass_owners(models)
            if self._pending:
                self._prefilling.append(self._new_group([self._start(r) for r in self._pending], models, owner))
                self._pending = []
            if not self._active and not self._prefilling:
                return deltas
            logprobs: dict[str, torch.Tensor] = {}
            for key, model in models.items():
                state = self._states.get(key)
                if owner[key] == key and state is not None and state.rows:
                    logprobs[key] = state.runner.decode()
            for active in self._active.values():
                active.usage.forward_passes += len({owner.get(m, m) for m, _ in active.request.contexts})
            for group in self._advance_prefill(models, deltas):
                for key, part in group.parts.items():
                    state = self._state(key, models)
                    state.runner.join(part.prefill)
                    state.rows.extend(part.rows)
                    assert part.logprobs is not None
                    logprobs[key] = torch.cat([logprobs[key], part.logprobs]) if key in logprobs else part.logprobs
                for active in group.members:
                    self._active[active.request.request_id] = active
            row_index = {key: {(id(a), t, k): i for i, (a, t, k) in enumerate(s.rows)} for key, s in self._states.items()}
            for key, pass_key in owner.items():
                if pass_key != key and pass_key in logprobs:
                    logprobs[key], row_index[key] = logprobs[pass_key], row_index[pass_key]
            self._choose_tokens(logprobs, row_index, deltas)
            self._reorder_rows()
        except Exception:
            # The shared pass failed (or a bug): the caches' state is unknown, so no
            # request may continue on them. Callers (the scheduler, run()) fail theirs.
            self.reset()
            raise
        return deltas

    def _drop_cancelled(self) -> None:
        """Apply cancellations: running requests leave the batch, prefilling ones their group."""
        for request_id in self._cancelled:
            if request_id in self._active:
                self._active[request_id].finish_reason = "cancelled"
        if self._cancelled and self._prefilling:
            for group in self._prefilling:
                group.members = [a for a in group.members if a.request.request_id not in self._cancelled]
                for key, part in list(group.parts.items()):
                    keep = [i for i, (a, _, _) in enumerate(part.rows) if a.request.request_id not in self._cancelled]
                    if not keep:
                        part.select([])  # frees what the runner holds for them
                        del group.parts[key]
                    elif len(keep) < len(part.rows):
                        part.select(keep)
            self._prefilling = [g for g in self._prefilling if g.members]
        self._cancelled.clear()
        self._reorder_rows()

    # -- prefill ----------------------------------------------------------------------

    def _new_group(self, members: list[_Active], models: Mapping[str, Any], owner: Mapping[str, str]) -> _PrefillGroup:
        parts: dict[str, _PrefillPart] = {}
        for key in dict.fromkeys(owner.values()):
            rows = [(a, 0, k) for a in members for k, (m, _) in enumerate(a.request.contexts) if owner.get(m, m) == key]
            if not rows:
                continue
            seqs = [a.request.contexts[k][1] for a, _, k in rows]
            tags = [a.request.contexts[k][0] for a, _, k in rows]
            parts[key] = _PrefillPart(rows=rows, prefill=self._state(key, models).runner.start_prefill(seqs, tags))
        return _PrefillGroup(members=members, parts=parts)

    def _state(self, key: str, models: Mapping[str, Any]) -> _ModelState:
        """The running state of pass key ``key`` (a fresh runner once it has no rows and its model changed)."""
        state = self._states.get(key)
        model = models[key]
        if state is None or (not state.rows and getattr(state.runner, "model", model) is not model):
            state = self._states[key] = _ModelState(runner=runner_for(model, self.tokenizer.pad_token_id or 0))
        return state

    def _advance_prefill(self, models: Mapping[str, Any], deltas: list[Delta]) -> list[_PrefillGroup]:
        """Run the next chunk of each prefilling group, oldest first, within the token budget
        of each model's forward; return the groups whose prefill is complete."""
        # Chunking protects running requests' next token; with none running, a prefill
        # has no one to wait for and runs whole (one forward instead of many small ones).
        running = any(a.finish_reason is None for a in self._active.values())
        chunk = self.prefill_chunk if running or self.chunk_idle_prefill else None
        budget: dict[str, int | None] = {key: chunk for key in models}
        completed: list[_PrefillGroup] = []
        queue = list(self._prefilling)
        self._prefilling = []
        while queue:
            group = queue.pop(0)
            try:
                for key, part in group.parts.items():
                    left = budget.get(key)
                    if part.finished or (left is not None and left <= 0):
                        continue
                    spent = self._state(key, models).runner.prefill_step(part.prefill, left)
                    if left is not None:
                        budget[key] = left - spent
                    for active in {id(a): a for a, _, _ in part.rows}.values():
                        active.usage.forward_passes += 1
            except Exception as exc:
                for part in group.parts.values():
                    part.select([])  # frees what the runner holds for them
                if len(group.members) > 1:
                    # Find the culprit: each member is prefilled again on its own.
                    log.warning("prefill of %d requests failed (%s: %s); retrying them one by one", len(group.members), type(exc).__name__, exc)
                    owner = self._pass_owners(models)
                    queue[:0] = [self._new_group([a], models, owner) for a in group.members]
                else:
                    for active in group.members:
                        self._fail(active, f"prefill failed: {type(exc).__name__}: {exc}", deltas)
                continue
            (completed if group.finished else self._prefilling).append(group)
        return completed

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
        return _Active(
            request=request,
            tracks=[_Track()],
            usage=usage,
            generator=generator,
            started=time.perf_counter(),
            max_stop_len=max((len(s) for s in request.stop), default=0),
        )

    def _device(self, key: str) -> torch.device:
        device = getattr(self.models[key], "device", None)
        if isinstance(device, torch.device):
            return device
        try:
            return next(self.models[key].parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

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

    # -- token choice ---------------------------------------------------------------

    def _choose_tokens(
        self,
        logprobs: dict[str, torch.Tensor],
        row_index: dict[str, dict[tuple[int, int, int], int]],
        deltas: list[Delta],
    ) -> None:
        groups: dict[tuple[Method, tuple[float, ...]], list[_Active]] = {}
        for active in self._active.values():
            if active.finish_reason is None:
                groups.setdefault((active.request.method, active.request.weights), []).append(active)
        for (method, weights), members in groups.items():
            # A group's fault (its method's combine, say) fails its requests, no one else's.
            try:
                scores = self._group_scores(method, weights, members, logprobs, row_index)
            except Exception as exc:
                for active in members:
                    self._fail(active, f"{method.name} could not score the next token: {type(exc).__name__}: {exc}", deltas)
                continue
            usable = torch.isfinite(scores).any(dim=-1).tolist()
            if not all(usable):
                members = self._fail_unusable(members, usable, deltas)
                if not members:
                    continue
                scores = scores[torch.tensor(usable)]
            greedy = method.beam_width == 1 and all(a.request.sampling.greedy for a in members)
            chosen = scores.argmax(dim=-1).tolist() if greedy else None
            offset = 0
            for a in members:
                n = len(a.tracks)
                block = scores[offset:offset + n]
                offset += n
                try:
                    if chosen is not None:
                        self._advance(a, 0, chosen[offset - 1], deltas)
                    elif method.beam_width > 1:
                        self._beam_update(a, block, method, deltas)
                    else:
                        self._advance(a, 0, self._sample(a, block[0]), deltas)
                except Exception as exc:
                    self._fail(a, f"could not choose the next token: {type(exc).__name__}: {exc}", deltas)

    def _group_scores(
        self,
        method: Method,
        weights: tuple[float, ...],
        members: list[_Active],
        logprobs: dict[str, torch.Tensor],
        row_index: dict[str, dict[tuple[int, int, int], int]],
    ) -> torch.Tensor:
        """The method's scores ``[tracks of all members, V]``; NaN becomes −inf (ruled out)."""
        models = [m for m, _ in members[0].request.contexts]
        blocks = []
        for k, model_key in enumerate(models):
            idx = [row_index[model_key][(id(a), t, k)] for a in members for t in range(len(a.tracks))]
            blocks.append(logprobs[model_key][torch.tensor(idx, device=logprobs[model_key].device)])
        stacked = torch.stack(blocks, dim=1)  # [tracks of all members, K, V]
        scores = method.score(stacked, torch.tensor(weights, dtype=stacked.dtype, device=stacked.device))
        # NaN (e.g. −inf − −inf where both contexts rule a token out) means "ruled out".
        return scores.masked_fill(scores.isnan(), _NEG_INF)

    def _fail(self, active: _Active, message: str, deltas: list[Delta]) -> None:
        """Finish one request with ``finish_reason="error"`` and say why (one log line)."""
        if active.finish_reason is not None:
            return
        log.warning("request %s failed: %s", active.request.request_id, message)
        self._finish(active, "error", deltas, active.tracks[0], new_tokens=[], error=message)

    def _fail_unusable(self, members: list[_Active], usable: list[bool], deltas: list[Delta]) -> list[_Active]:
        """Finish (reason "error") the requests with a track whose scores are all −inf/NaN."""
        keep, offset = [], 0
        for active in members:
            n = len(active.tracks)
            if all(usable[offset:offset + n]):
                keep.append(active)
            else:
                self._fail(active, f"method {active.request.method.name!r} ruled out every token (all scores −inf or NaN)", deltas)
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

    def _finish(self, active: _Active, reason: str, deltas: list[Delta], track: _Track, new_tokens: list[int], error: str | None = None) -> None:
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
            error=error,
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
            state.runner.select(keep, tokens)
            state.rows = rows
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
