"""The decoding engine: B prompts × K contexts per step, in one batched forward per model.

Every method, the CLI, the server and the evaluation decode through :class:`Engine`.
The engine decides which rows exist (requests × contexts × beam tracks) and runs the
step loop (:meth:`Engine.step`); the rest lives beside it:

* KV state of one model's rows — :mod:`prefalign.runners` (``decode``, ``start_prefill``
  / ``prefill_step``, ``join``, ``select``);
* token choice — :mod:`prefalign.decoding`: greedy, sampling, beam search (a request's
  *search strategy*: the method's ``search()``, else its sampling settings);
* stop strings and streamable text — :mod:`prefalign.decoding.stopping`; usage counts —
  :mod:`prefalign.usage`;
* streaming (submit, read events, cancel what is left) — :meth:`Engine.session`,
  :mod:`prefalign.streaming`.

One step (see docs/architecture.md):

1. Queued requests form a *prefill group*: their contexts, left-padded together, run
   through each model with a fresh KV cache (whole, or ``prefill_chunk`` tokens per
   model forward per step while others are running); a complete group's rows join
   the running rows.
2. Every running row is fed its last token (one forward per model over all rows); the
   last position's log-softmax of each row is gathered per request into a
   ``[tracks, K, V]`` block that the method's ``combine`` turns into ``[tracks, V]``
   scores. Requests sharing a method and weights are combined in one call.
3. Each request's strategy turns its scores into tokens; the token is appended to all K
   contexts of its track; EOS, stop strings and ``max_new_tokens`` end a request.
4. Finished rows leave the batch and beam tracks follow their parents — one row
   selection on every runner.

Requests can join and leave between steps (continuous batching): :meth:`Engine.add`,
:meth:`Engine.cancel`, :meth:`Engine.step`. A fault while preparing, combining or
sampling one group of requests fails those requests alone (``finish_reason="error"``,
``GenerationResult.error`` says why); every other request continues unchanged.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .decoding import BeamSearch, BeamState, Greedy, SearchStrategy, StopStrings, make_generator, strategy_for
from .decoding.sampling import GREEDY_TEMPERATURE, SEED_MAX, SEED_MIN, SamplingParams  # noqa: F401 - re-exported: they lived here
from .decoding.detokenize import IncrementalText
from .decoding.stopping import drop_incomplete_tail
from .errors import PrefalignError
from .methods import POLICY, Method
from .runners import ModelRunner, Prefill, pass_owners, runner_for
from .runners.kv_cache import left_pad, positions_from_mask  # noqa: F401 - re-exported: they lived here before runners/
from .streaming import Session
from .usage import Usage

_NEG_INF = float("-inf")
log = logging.getLogger(__name__)


# --- Public data types -------------------------------------------------------------


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

    @property
    def strategy(self) -> SearchStrategy:
        """How its scores become tokens: the method's search (beam), else greedy or sampling."""
        return strategy_for(self.method, self.sampling)


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
    detok: IncrementalText | None = None  # keeps ``text`` decoded, one tail at a time


@dataclass
class _Active:
    request: GenerationRequest
    tracks: list[_Track]
    usage: Usage
    strategy: SearchStrategy
    generator: torch.Generator | None
    started: float
    stops: StopStrings
    beam: BeamState | None = None  # beam search's finished hypotheses
    finish_reason: str | None = None


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

    def holds(self, request_id: str) -> bool:
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
        request.strategy  # noqa: B018 - the strategy checks the sampling settings (beam: greedy only)

    # -- driving --------------------------------------------------------------------

    def session(self, requests: Sequence[GenerationRequest] = ()) -> Session:
        """Submit ``requests`` (all validated before any is queued) and stream their events.

        ``with engine.session(requests) as session: for event in session: ...`` — each
        event is a :class:`Delta` with, on a request's last one, its popped result.
        However the block ends (all finished, ``break``, an exception), the requests
        left unfinished are cancelled and the engine stays usable. See
        :class:`~prefalign.streaming.Session` (the server keeps one open and adds to it).
        """
        return Session(self, requests)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` to completion; results in the order given."""
        with self.session(requests) as session:
            results = {event.request_id: event.result for event in session if event.result is not None}
        return [results[r.request_id] for r in requests]

    @torch.inference_mode()
    def apply_cancellations(self) -> None:
        """Let cancelled requests leave now (their rows, their runners' memory), not at the next step."""
        if self._cancelled:
            self._drop_cancelled()

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
            owner = self._pass_owners(models)  # which model's forward computes each key's rows
            if self._pending:
                self._prefilling.append(self._new_group([self._start(r) for r in self._pending], models, owner))
                self._pending = []
            if not self._active and not self._prefilling:
                return deltas
            logprobs = self._decode(models, owner)  # running rows: one forward per model
            self._prefill(models, logprobs, deltas)  # the next chunk; complete groups join the running rows
            row_index = self._row_index(owner, logprobs)
            self._choose_tokens(logprobs, row_index, deltas)  # method.combine, then each request's strategy
            self._reorder_rows()  # finished rows leave, beams follow their parents
        except Exception:
            # The shared pass failed (or a bug): the caches' state is unknown, so no
            # request may continue on them. Callers (the scheduler, sessions) fail theirs.
            self.reset()
            raise
        return deltas

    def _decode(self, models: Mapping[str, Any], owner: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """Each pass key's running rows' next-token log-probs ``[rows, V]`` (one forward per model)."""
        logprobs: dict[str, torch.Tensor] = {}
        for key in models:
            state = self._states.get(key)
            if owner[key] == key and state is not None and state.rows:
                logprobs[key] = state.runner.decode()
        for active in self._active.values():
            active.usage.forward_passes += len({owner.get(m, m) for m, _ in active.request.contexts})
        return logprobs

    def _prefill(self, models: Mapping[str, Any], logprobs: dict[str, torch.Tensor], deltas: list[Delta]) -> None:
        """Advance the prefills; a complete group's rows join the running rows, and their
        last-position log-probs are appended to ``logprobs`` (its first tokens are chosen now)."""
        for group in self._advance_prefill(models, deltas):
            for key, part in group.parts.items():
                state = self._state(key, models)
                state.runner.join(part.prefill)
                state.rows.extend(part.rows)
                assert part.logprobs is not None
                logprobs[key] = torch.cat([logprobs[key], part.logprobs]) if key in logprobs else part.logprobs
            for active in group.members:
                self._active[active.request.request_id] = active

    def _row_index(self, owner: Mapping[str, str], logprobs: dict[str, torch.Tensor]) -> dict[str, dict[tuple[int, int, int], int]]:
        """Per model key: (request, track, context) → row of ``logprobs[key]``. A key served by
        another model's pass (fused PAD) reads that pass's rows."""
        row_index = {key: {(id(a), t, k): i for i, (a, t, k) in enumerate(s.rows)} for key, s in self._states.items()}
        for key, pass_key in owner.items():
            if pass_key != key and pass_key in logprobs:
                logprobs[key], row_index[key] = logprobs[pass_key], row_index[pass_key]
        return row_index

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
        strategy = request.strategy
        return _Active(
            request=request,
            tracks=[_Track()],
            usage=Usage.of_contexts(request.contexts, request.primary),
            strategy=strategy,
            generator=make_generator(request.sampling.seed, self._device(POLICY)),
            started=time.perf_counter(),
            stops=StopStrings(request.stop),
            beam=strategy.start() if isinstance(strategy, BeamSearch) else None,
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
        """Which pass key computes each model key's rows (see :func:`prefalign.runners.pass_owners`)."""
        busy = {key for key, state in self._states.items() if state.rows}
        return pass_owners(dict(self.models) if models is None else models, busy)

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
            # All greedy (the usual case): one argmax for the whole group.
            chosen = Greedy.tokens(scores) if all(isinstance(a.strategy, Greedy) for a in members) else None
            offset = 0
            for a in members:
                n = len(a.tracks)
                block = scores[offset:offset + n]
                offset += n
                try:
                    if chosen is not None:
                        self._advance(a, chosen[offset - 1], deltas)
                    elif isinstance(a.strategy, BeamSearch):
                        self._beam_step(a, a.strategy, block, deltas)
                    else:
                        self._advance(a, a.strategy.token(block[0], a.generator), deltas)
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

    def _advance(self, active: _Active, token: int, deltas: list[Delta]) -> None:
        """Append ``token`` to a one-hypothesis request and decide whether it finished."""
        request, track = active.request, active.tracks[0]
        if token in self.eos_token_ids and not request.ignore_eos:
            self._finish(active, "stop", deltas, track, new_tokens=[])
            return
        track.tokens.append(token)
        active.usage.completion_tokens = len(track.tokens)
        reason = None
        previous = len(track.text)
        if track.detok is None:
            track.detok = IncrementalText(self.tokenizer)
        track.text = track.detok.update(track.tokens)  # == decode(track.tokens), decoding only the new tail
        cut = active.stops.cut(track.text, previous)
        if cut is not None:
            track.text = track.text[:cut]
            reason = "stop"
        if reason is None and len(track.tokens) >= request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(active, reason, deltas, track, new_tokens=[token])
        else:
            self._emit(active, track, [token], deltas, final=False)

    def _emit(self, active: _Active, track: _Track, tokens: list[int], deltas: list[Delta], *, final: bool, reason: str | None = None) -> None:
        """Stream the part of ``track.text`` (kept decoded by the caller) that is safe to show."""
        # A running answer holds back an incomplete UTF-8 character and anything that may begin a stop string.
        safe = len(track.text) if final else active.stops.safe_end(track.text, track.emitted)
        text = track.text[track.emitted:safe]
        track.emitted = safe
        if text or tokens or final:
            deltas.append(Delta(active.request.request_id, text, tokens, reason))

    def _finish(self, active: _Active, reason: str, deltas: list[Delta], track: _Track, new_tokens: list[int], error: str | None = None) -> None:
        """Record the result, stream what is left of the text; rows leave at the next reorder."""
        if reason == "length":
            track.text = drop_incomplete_tail(track.text)
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

    def _beam_step(self, active: _Active, search: BeamSearch, scores: torch.Tensor, deltas: list[Delta]) -> None:
        """One beam-search step of one request: its tracks follow the surviving hypotheses
        (rows are reordered at the next :meth:`_reorder_rows`), or it finishes with the best."""
        assert active.beam is not None
        step = search.step(
            active.tracks, scores, active.beam,
            eos_token_ids=self.eos_token_ids, ignore_eos=active.request.ignore_eos, max_new_tokens=active.request.max_new_tokens,
        )
        active.usage.completion_tokens = step.generated
        if step.done is not None:
            tokens, reason = step.done
            best = _Track(tokens=tokens, text=self.tokenizer.decode(tokens, skip_special_tokens=True))
            self._finish(active, reason, deltas, best, new_tokens=tokens)
            return
        active.tracks = [_Track(tokens=h.tokens, score=h.score, parent=h.parent) for h in step.running]

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
