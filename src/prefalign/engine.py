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
2. Every running row is fed its last token (one forward per model over all rows). The
   *step plan* (rebuilt only when rows join, leave or follow beams) says where each
   group's rows lie: requests sharing a method, weights and kind of token choice get
   one ``[tracks, K, V]`` block (a view when in order) that the method's ``combine``
   turns into ``[tracks, V]`` scores.
3. The repetition controls of the requests that set them (:mod:`prefalign.decoding.repetition`,
   one batched op over their rows) adjust the scores; tokens are chosen on the device
   per group (greedy: one max; sampling: one batched draw, seeded per request; beam
   search: its own path); one device→host transfer brings all of them; each is
   appended to its track (and history); EOS, stop strings and ``max_new_tokens`` end a
   request; the text is decoded incrementally.
4. Rows unchanged: each runner is fed its next tokens on the device. Otherwise finished
   rows leave the batch and beam tracks follow their parents — one row selection on
   every runner.

Requests can join and leave between steps (continuous batching): :meth:`Engine.add`,
:meth:`Engine.cancel`, :meth:`Engine.step`. A fault while preparing, combining or
sampling one group of requests fails those requests alone (``finish_reason="error"``,
``GenerationResult.error`` says why); every other request continues unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .decoding import BeamSearch, BeamState, Greedy, Sampling, SearchStrategy, StopStrings, make_generator, strategy_for
from .decoding.detokenize import IncrementalText
from .decoding.repetition import Histories, TokenHistory, apply_repetition_controls
from .decoding.sampling import GREEDY_TEMPERATURE, SEED_MAX, SEED_MIN, SamplingParams, sample_rows  # noqa: F401 - re-exported: they lived here
from .decoding.stopping import drop_incomplete_tail
from .errors import PrefalignError
from .methods import POLICY, Method
from .runners import ModelRunner, Prefill, pass_owners, runner_for
from .runners.kv_cache import left_pad, positions_from_mask  # noqa: F401 - re-exported: they lived here before runners/
from .streaming import Session
from .usage import Usage

_NEG_INF = float("-inf")
_SMALLEST = 5e-324  # the smallest positive float64
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
    #: Which of the ``n`` answers of its prompt this is (see :meth:`split_choices`).
    choice: int = 0

    def __post_init__(self) -> None:
        # Preferences parsed by prefalign.prompts are already checked; a request built by
        # hand is checked here, where the weights are held.
        self.weights = normalise_weights(self.weights)

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

    def split_choices(self) -> list[GenerationRequest]:
        """The ``sampling.n`` answers as requests the engine runs: answer i has id
        ``"{request_id}-{i}"``, ``choice`` i and ``sampling.for_choice(i)`` (seed + i).

        Submitted together they form one prefill group, whose identical contexts are
        prefilled once (see :class:`Engine`): the prompt's prefill is shared. ``n = 1``:
        ``[self]``.
        """
        if self.sampling.n == 1:
            return [self]
        return [
            dataclasses.replace(self, request_id=f"{self.request_id}-{i}", sampling=self.sampling.for_choice(i), choice=i)
            for i in range(self.sampling.n)
        ]


@dataclass
class Delta:
    """What one step added to one request's answer (streaming unit)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    #: One entry per token of ``token_ids`` when the request asked for ``logprobs``, else None.
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the method's final scores (the log-softmax
    of what ``Method.combine`` returned, after the engine rules out NaN), and the
    ``top_logprobs`` most likely tokens with theirs (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    #: Per token of ``token_ids``, when the request asked for ``logprobs`` (else None).
    logprobs: list[TokenLogprob] | None = None
    #: Which of its prompt's ``n`` answers this is (``GenerationRequest.choice``).
    choice: int = 0


def normalise_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Preference weights scaled by a power of two so that the largest lies in [1, 2).

    Any finite positive weights are valid, from subnormals to 1e308; only their ratios
    count (methods use the shares ``w / w.sum()``). Scaled once here, in float64 before
    the engine casts them to the scores' float32, they can neither overflow (``1e300``
    and ``1`` become about ``1`` and ``1e-300``) nor all round to zero, so no method's
    weighted mean turns into NaN. A power of two scales exactly: weights that fit
    float32 give bit-identical shares (and weights whose largest is in [1, 2) are kept
    as given). A weight below float32's range after scaling becomes 0 there: that
    preference counts for nothing, as its share (under 1e-38) already did.
    """
    if not weights or any(
        not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0 for w in weights
    ):
        raise PrefalignError(f"preference weights must be finite numbers > 0, got {tuple(weights)!r}", field="preference")
    exponent = math.frexp(max(float(w) for w in weights))[1] - 1  # largest = m · 2**exponent, 1 ≤ m < 2
    # A ratio below float64's range would round to 0: keep it the smallest positive weight.
    return tuple(math.ldexp(float(w), -exponent) or _SMALLEST for w in weights)


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
    #: Kept only for requests with repetition controls or a method that reads the answer.
    history: TokenHistory | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, if the request asked


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
    passes: int = 0  # model forwards that compute its rows each step (distinct pass keys)


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
    #: Row i is the prefill's sequence ``source[i]``: rows with identical prompts (the
    #: ``n`` answers of a request, say) share one; None: one sequence per row.
    source: list[int] | None = None

    @property
    def finished(self) -> bool:
        return self.prefill.finished

    @property
    def logprobs(self) -> torch.Tensor | None:
        return self.prefill.logprobs

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (a request left while it was being prefilled)."""
        self.rows = [self.rows[i] for i in keep]
        if self.source is None:
            self.prefill.select(keep)
            return
        source = [self.source[i] for i in keep]
        used = list(dict.fromkeys(source))
        self.prefill.select(used)
        self.source = [used.index(s) for s in source]

    def unshare(self) -> None:
        """Give each row its own copy of its sequence (once prefilled, before joining)."""
        if self.source is not None:
            self.prefill.select(self.source)  # repeats copy a shared sequence
            self.source = None


@dataclass
class _PrefillGroup:
    """Requests that joined in the same step, prefilled together (in chunks if configured)."""

    members: list[_Active]
    parts: dict[str, _PrefillPart]  # pass key -> rows it computes

    @property
    def finished(self) -> bool:
        return all(part.finished for part in self.parts.values())


@dataclass
class _ScoreGroup:
    """Requests scored by one method call and whose tokens are chosen together: same
    method, same weights, same kind of token choice (``"greedy"``, ``"sample"``, ``"beam"``)."""

    method: Method
    weights: torch.Tensor  # [P], on the scores' device
    kind: str
    members: list[_Active]
    tracks: int
    #: per context: (pass key, rows of that pass's log-probs: a slice where they lie in
    #: order, else an index tensor), one row per track
    sources: list[tuple[str, slice | torch.Tensor]]
    #: all contexts in one pass, rows ``start .. start + tracks·K`` in (track, context)
    #: order: the stacked ``[tracks, K, V]`` block is a view, no gather
    view: tuple[str, int] | None
    offset: int  # first position of its tracks in the step's token vector
    params: list[SamplingParams] = field(default_factory=list)
    uses_history: bool = False  # the method reads the answers so far (``Histories``)
    penalizes: bool = False  # a member has repetition controls (post-score stage)


@dataclass
class _StepPlan:
    """Where every running row's log-probs go and where its next token comes from.

    Built when rows join, leave or follow beams (:meth:`Engine._plan_step`), reused by
    every step in between: a step then builds no index from Python lists.
    """

    groups: list[_ScoreGroup]
    #: pass key -> for each of its runner's rows, its track's position in the token vector
    feeds: dict[str, torch.Tensor]
    tracks: int


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
        self._plan: _StepPlan | None = None  # None: rebuild at the next step
        self._dirty = False  # rows must leave or follow beams (``_reorder_rows``)
        #: False while a step (or a cancellation) changes the rows and runners: if it never
        #: finishes (Ctrl-C, any BaseException, even during the reset that follows), the
        #: next use of the engine resets it first.
        self._consistent = True
        self._changing_thread: int | None = None  # the thread that set ``_consistent`` False

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
        self._repair()
        self._pending.append(request)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Drop a request (queued, prefilling or running); its rows leave the batch at the next step."""
        self._repair()
        self._pending = [r for r in self._pending if r.request_id != request_id]
        if request_id in self._active or self._is_prefilling(request_id):
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        self._repair()
        return bool(self._pending or self._prefilling or self._active)

    def _is_prefilling(self, request_id: str) -> bool:
        return any(a.request.request_id == request_id for g in self._prefilling for a in g.members)

    def holds(self, request_id: str) -> bool:
        """Queued, prefilling or running (not finished, not dropped)."""
        self._repair()
        return request_id in self._active or any(r.request_id == request_id for r in self._pending) or self._is_prefilling(request_id)

    @property
    def num_active(self) -> int:
        self._repair()
        return len(self._active)

    def pop_result(self, request_id: str) -> GenerationResult | None:
        """The finished result of a request (once), or None if not finished."""
        return self._results.pop(request_id, None)

    def reset(self) -> None:
        """Forget every queued, running and finished request (e.g. after a failed step)."""
        self._begin_change()
        self._pending, self._prefilling, self._active, self._states = [], [], {}, {}
        self._results, self._cancelled = {}, set()
        self._plan, self._dirty = None, False
        self._consistent = True

    def _begin_change(self) -> None:
        """Mark the rows and runners as being changed by this thread (see ``_consistent``)."""
        self._changing_thread = threading.get_ident()
        self._consistent = False

    def _repair(self) -> None:
        """Reset if the last step or cancellation was interrupted half-way (see ``_consistent``).

        Another thread's step still in progress (the server's scheduler thread, read by a
        request handler asking ``num_active``) is no interruption: it is left alone.
        """
        if self._consistent:
            return
        changing = self._changing_thread
        if changing != threading.get_ident() and any(t.ident == changing for t in threading.enumerate()):
            return
        log.warning("the last engine step was interrupted; its requests were dropped")
        self.reset()

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
        if request.sampling.n != 1:
            raise PrefalignError(
                f"a request for n={request.sampling.n} answers is n requests: submit request.split_choices()", field="n"
            )
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
        self._repair()
        if self._cancelled:
            self._begin_change()
            try:
                self._drop_cancelled()
            except BaseException:
                self.reset()
                raise
            self._consistent = True

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Advance every running request by one token and prefill queued ones (a chunk of
        them when ``prefill_chunk`` is set).

        A fault in one group of requests (its prefill, its method's ``combine``, its
        sampling) fails that group alone. A fault in the forward pass that every running
        request shares leaves no request in the engine (it is :meth:`reset`) and is raised.
        So does any interruption of the step (``KeyboardInterrupt``, any ``BaseException``):
        the requests it was advancing are dropped, the runners with them, and the next
        call starts from an engine as good as new.
        """
        deltas: list[Delta] = []
        self._repair()
        self._begin_change()
        try:
            self._drop_cancelled()
            models = dict(self.models)  # a model added meanwhile (another thread) joins at the next step
            owner = self._pass_owners(models)  # which model's forward computes each key's rows
            if self._pending:
                self._prefilling.append(self._new_group([self._start(r) for r in self._pending], models, owner))
                self._pending = []
            if not self._active and not self._prefilling:
                self._consistent = True
                return deltas
            # Stages: forward → plan → score → choose → one transfer → update → rows.
            logprobs = self._decode(models, owner)  # running rows: one forward per model
            self._prefill(models, logprobs, deltas)  # the next chunk; complete groups join the running rows
            plan = self._plan_step()  # rebuilt only when rows joined, left or followed beams
            chosen = self._score_and_choose(plan, logprobs, deltas)  # method.combine, token choice on the device
            self._update(plan, chosen, deltas)  # one device→host transfer; EOS, stop strings, length
            if self._dirty:
                self._reorder_rows()  # finished rows leave, beams follow their parents
            elif chosen is not None:
                self._feed(plan, chosen[0])  # same rows: next tokens stay on the device
        except BaseException:
            # The shared pass failed (or a bug), or the step was interrupted (Ctrl-C):
            # the caches' state is unknown, so no request may continue on them. Callers
            # (the scheduler, sessions) fail theirs.
            self.reset()
            raise
        self._consistent = True
        return deltas

    def _decode(self, models: Mapping[str, Any], owner: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """Each pass key's running rows' next-token log-probs ``[rows, V]`` (one forward per model)."""
        logprobs: dict[str, torch.Tensor] = {}
        for key in models:
            state = self._states.get(key)
            if owner[key] == key and state is not None and state.rows:
                logprobs[key] = state.runner.decode()
        for active in self._active.values():
            active.usage.forward_passes += active.passes
        return logprobs

    def _prefill(self, models: Mapping[str, Any], logprobs: dict[str, torch.Tensor], deltas: list[Delta]) -> None:
        """Advance the prefills; a complete group's rows join the running rows, and their
        last-position log-probs are appended to ``logprobs`` (its first tokens are chosen now)."""
        for group in self._advance_prefill(models, deltas):
            for key, part in group.parts.items():
                state = self._state(key, models)
                part.unshare()
                state.runner.join(part.prefill)
                state.rows.extend(part.rows)
                assert part.logprobs is not None
                logprobs[key] = torch.cat([logprobs[key], part.logprobs]) if key in logprobs else part.logprobs
            for active in group.members:
                active.passes = sum(any(a is active for a, _, _ in part.rows) for part in group.parts.values())
                self._active[active.request.request_id] = active
            self._plan = None

    def _drop_cancelled(self) -> None:
        """Apply cancellations: running requests leave the batch, prefilling ones their group."""
        for request_id in self._cancelled:
            if request_id in self._active:
                self._active[request_id].finish_reason = "cancelled"
                self._dirty = True
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
            # Identical contexts (same model, same tokens) are prefilled once and copied at join.
            first: dict[tuple[str, tuple[int, ...]], int] = {}
            source = [first.setdefault((m, tuple(ids)), len(first)) for m, ids in (a.request.contexts[k] for a, _, k in rows)]
            seqs = [list(ids) for _, ids in first]
            tags = [m for m, _ in first]
            shared = None if len(first) == len(rows) else source
            parts[key] = _PrefillPart(rows=rows, prefill=self._state(key, models).runner.start_prefill(seqs, tags), source=shared)
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
        history = None
        if request.sampling.penalizes or getattr(request.method, "uses_history", False):
            history = TokenHistory(request.contexts[request.primary][1])
        return _Active(
            request=request,
            tracks=[_Track(history=history)],
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

    def _plan_step(self) -> _StepPlan:
        """The current plan; rebuilt (host work over every row) only after rows changed."""
        if self._plan is None:
            self._plan = self._build_plan()
        return self._plan

    def _build_plan(self) -> _StepPlan:
        where: dict[tuple[int, int, int], tuple[str, int]] = {}
        for key, state in self._states.items():
            for i, (a, t, k) in enumerate(state.rows):
                where[(id(a), t, k)] = (key, i)
        by_key: dict[tuple[Method, tuple[float, ...], str], list[_Active]] = {}
        for active in self._active.values():
            if active.finish_reason is None:
                strategy = active.strategy
                kind = "beam" if isinstance(strategy, BeamSearch) else "greedy" if isinstance(strategy, Greedy) else "sample"
                by_key.setdefault((active.request.method, active.request.weights, kind), []).append(active)
        groups: list[_ScoreGroup] = []
        position: dict[tuple[int, int], int] = {}  # (request, track) -> place in the token vector
        offset = 0
        for (method, weights, kind), members in by_key.items():
            tracks = [(a, t) for a in members for t in range(len(a.tracks))]
            for n, (a, t) in enumerate(tracks):
                position[(id(a), t)] = offset + n
            n_contexts = len(members[0].request.contexts)
            located = [[where[(id(a), t, k)] for a, t in tracks] for k in range(n_contexts)]
            keys = {key for column in located for key, _ in column}
            device = _runner_device(self._states[next(iter(keys))].runner) if keys else torch.device("cpu")
            sources = []
            for column in located:
                if len({key for key, _ in column}) != 1:
                    raise RuntimeError("a context's rows are split over two models' caches")  # never: one pass per key
                rows = [i for _, i in column]
                if rows == list(range(rows[0], rows[0] + len(rows))):
                    sources.append((column[0][0], slice(rows[0], rows[0] + len(rows))))  # in order: a view
                else:
                    sources.append((column[0][0], torch.tensor(rows, dtype=torch.long, device=_runner_device(self._states[column[0][0]].runner))))
            view = None
            if len(keys) == 1:
                start = located[0][0][1]
                flat = [located[k][n][1] for n in range(len(tracks)) for k in range(n_contexts)]
                if flat == list(range(start, start + len(flat))):
                    view = (next(iter(keys)), start)
            groups.append(_ScoreGroup(
                method=method, weights=torch.tensor(weights, dtype=torch.float32, device=device), kind=kind,
                members=members, tracks=len(tracks), sources=sources, view=view, offset=offset,
                params=[a.request.sampling for a in members] if kind == "sample" else [],
                uses_history=bool(getattr(method, "uses_history", False)),
                penalizes=any(a.request.sampling.penalizes for a in members),
            ))
            offset += len(tracks)
        feeds = {}
        for key, state in self._states.items():
            if state.rows:
                index = [position.get((id(a), t), 0) for a, t, _ in state.rows]
                feeds[key] = torch.tensor(index, dtype=torch.long, device=_runner_device(state.runner))
        return _StepPlan(groups=groups, feeds=feeds, tracks=offset)

    def _group_logprobs(self, group: _ScoreGroup, logprobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The group's stacked log-probs ``[tracks, K, V]`` (a view when its rows lie in order)."""
        if group.view is not None:
            key, start = group.view
            rows = logprobs[key]
            return rows[start:start + group.tracks * len(group.sources)].view(group.tracks, len(group.sources), rows.shape[-1])
        return torch.stack(
            [logprobs[key][index] if isinstance(index, slice) else logprobs[key].index_select(0, index) for key, index in group.sources],
            dim=1,
        )

    def _score_and_choose(
        self, plan: _StepPlan, logprobs: dict[str, torch.Tensor], deltas: list[Delta]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None:
        """Every group's scores (one ``method.score`` call per group) and tokens, on the device:
        ``(tokens [tracks], ok [tracks], scores by group index)``; beam groups choose here
        (their own path, reading their scores on the host). None: nothing to choose."""
        if not plan.groups:
            return None
        tokens: list[torch.Tensor] = []
        oks: list[torch.Tensor] = []
        kept: dict[int, torch.Tensor] = {}
        for g, group in enumerate(plan.groups):
            tokens_g = ok_g = None
            # A group's fault (its method's combine, say) fails its requests, no one else's.
            try:
                scores = self._group_scores(group, logprobs)
            except Exception as exc:
                for active in group.members:
                    self._fail(active, f"{group.method.name} could not score the next token: {type(exc).__name__}: {exc}", deltas)
                scores = None
            if scores is not None:
                kept[g] = scores
                if group.kind == "greedy":
                    values, tokens_g = scores.max(dim=-1)  # NaN propagates to the max: such rows are not ok
                    ok_g = torch.isfinite(values)
                elif group.kind == "sample":
                    try:
                        tokens_g, ok_g = sample_rows(scores, group.params, [a.generator for a in group.members])
                    except Exception:
                        tokens_g = None  # each request is sampled on its own in the update: the culprit fails alone
                else:
                    self._beam_group(group, scores, deltas)
            if tokens_g is None:
                tokens_g = torch.zeros(group.tracks, dtype=torch.long, device=group.weights.device)
                ok_g = torch.zeros(group.tracks, dtype=torch.bool, device=group.weights.device)
            tokens.append(tokens_g.to(tokens[0].device) if tokens else tokens_g)
            oks.append(ok_g.to(tokens[0].device))
        return torch.cat(tokens), torch.cat(oks), kept

    def _update(self, plan: _StepPlan, chosen: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None, deltas: list[Delta]) -> None:
        """Append each request's token (one device→host transfer for all of them), decide
        whether it finished, and stream its text."""
        if chosen is None:
            return
        tokens, ok, kept = chosen
        host_tokens, host_ok = torch.stack([tokens, ok.to(tokens.dtype)]).tolist()
        for g, group in enumerate(plan.groups):
            if group.kind == "beam":
                continue
            scores = kept.get(g)
            for i, active in enumerate(group.members):
                if active.finish_reason is not None:  # its group failed
                    continue
                pos = group.offset + i
                token = host_tokens[pos]
                try:
                    if not host_ok[pos]:
                        assert scores is not None
                        token = self._choose_one(active, group.kind, scores[i], deltas)
                        if token is None:
                            continue
                        self._dirty = True  # the device's token vector does not have it
                    logprob = None
                    if active.request.sampling.logprobs:  # asked for: this request's row, on the host
                        assert scores is not None
                        row = scores[i]
                        logprob = _token_logprob(row.masked_fill(row.isnan(), _NEG_INF), token, active.request.sampling)
                    self._advance(active, token, deltas, logprob)
                except Exception as exc:
                    self._fail(active, f"could not choose the next token: {type(exc).__name__}: {exc}", deltas)

    def _choose_one(self, active: _Active, kind: str, row: torch.Tensor, deltas: list[Delta]) -> int | None:
        """A row the batched choice could not take (NaN or ±inf scores, or a failed batched
        draw), chosen the way a request alone would be; None if the request failed."""
        row = row.masked_fill(row.isnan(), _NEG_INF)
        if not bool(torch.isfinite(row).any()):
            self._fail(active, f"method {active.request.method.name!r} ruled out every token (all scores −inf or NaN)", deltas)
            return None
        if kind == "greedy":
            return int(row.argmax())
        assert isinstance(active.strategy, Sampling)
        return active.strategy.token(row, active.generator)

    def _beam_group(self, group: _ScoreGroup, scores: torch.Tensor, deltas: list[Delta]) -> None:
        """Beam search keeps its own path: each request reorders its hypotheses on the host."""
        scores = scores.masked_fill(scores.isnan(), _NEG_INF)
        usable = torch.isfinite(scores).any(dim=-1).tolist()
        offset = 0
        for active in group.members:
            n = len(active.tracks)
            block = scores[offset:offset + n]
            ok = all(usable[offset:offset + n])
            offset += n
            if not ok:
                self._fail(active, f"method {active.request.method.name!r} ruled out every token (all scores −inf or NaN)", deltas)
                continue
            try:
                assert isinstance(active.strategy, BeamSearch)
                self._beam_step(active, active.strategy, block, deltas)
            except Exception as exc:
                self._fail(active, f"could not choose the next token: {type(exc).__name__}: {exc}", deltas)
        self._dirty = True  # tracks follow their parents

    def _feed(self, plan: _StepPlan, tokens: torch.Tensor) -> None:
        """Rows unchanged: each runner's next tokens are gathered from the chosen ones on the device."""
        for key, index in plan.feeds.items():
            runner = self._states[key].runner
            feed = getattr(runner, "feed", None)
            if callable(feed):
                feed(tokens.to(index.device).index_select(0, index))
            else:  # a runner without ``feed``: the same rows, told their tokens as a list
                runner.select(list(range(len(index))), tokens.index_select(0, index.to(tokens.device)).tolist())

    def _group_scores(self, group: _ScoreGroup, logprobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The method's scores ``[tracks, V]`` of one group, then the post-score stage
        (the repetition controls of the requests that set them, one batched op)."""
        stacked = self._group_logprobs(group, logprobs)
        histories = [t.history for a in group.members for t in a.tracks] if group.uses_history or group.penalizes else []
        if group.uses_history:
            scores = group.method.score(stacked, group.weights, history=Histories(histories))
        else:
            scores = group.method.score(stacked, group.weights)
        if group.penalizes:
            scores = apply_repetition_controls(scores, [a.request.sampling for a in group.members for _ in a.tracks], histories)
        return scores

    def _fail(self, active: _Active, message: str, deltas: list[Delta]) -> None:
        """Finish one request with ``finish_reason="error"`` and say why (one log line)."""
        if active.finish_reason is not None:
            return
        log.warning("request %s failed: %s", active.request.request_id, message)
        self._finish(active, "error", deltas, active.tracks[0], new_tokens=[], error=message)

    def _advance(self, active: _Active, token: int, deltas: list[Delta], logprob: TokenLogprob | None = None) -> None:
        """Append ``token`` (and its ``logprob``, if asked for) to a one-hypothesis request
        and decide whether it finished."""
        request, track = active.request, active.tracks[0]
        if token in self.eos_token_ids and not request.ignore_eos:
            self._finish(active, "stop", deltas, track, new_tokens=[])
            return
        track.tokens.append(token)
        if track.history is not None:
            track.history.push(token)
        if logprob is not None:
            track.logprobs.append(logprob)
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
            # ``tokens`` are the track's last ones (beam's answer: all of them, no logprobs).
            logprobs = track.logprobs[len(track.logprobs) - len(tokens):] if active.request.sampling.logprobs else None
            deltas.append(Delta(active.request.request_id, text, tokens, reason, logprobs))

    def _finish(self, active: _Active, reason: str, deltas: list[Delta], track: _Track, new_tokens: list[int], error: str | None = None) -> None:
        """Record the result, stream what is left of the text; rows leave at the next reorder."""
        if reason == "length":
            track.text = drop_incomplete_tail(track.text)
        active.finish_reason = reason
        self._dirty = True  # its rows leave at the next reorder
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
            logprobs=list(track.logprobs) if active.request.sampling.logprobs else None,
            choice=active.request.choice,
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
        old = active.tracks
        active.tracks = [
            _Track(tokens=h.tokens, score=h.score, parent=h.parent, history=None if (p := old[h.parent].history) is None else p.child(h.tokens[-1]))
            for h in step.running
        ]

    # -- row bookkeeping --------------------------------------------------------------

    def _reorder_rows(self) -> None:
        """Remove finished requests' rows and follow beam reordering, in every model's cache
        (only when something changed: ``_dirty``); the step plan is rebuilt next step."""
        if not self._dirty:
            return
        self._dirty = False
        self._plan = None
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


def _runner_device(runner: Any) -> torch.device:
    """Where a runner's log-probs live (llama.cpp's: the CPU)."""
    return torch.device(getattr(runner, "device", "cpu"))


def _token_logprob(scores: torch.Tensor, token: int, sampling: SamplingParams) -> TokenLogprob | None:
    """``token``'s log-probability under one row of a method's scores ``[V]`` (their
    log-softmax), with the ``top_logprobs`` best tokens; None unless asked for."""
    if not sampling.logprobs:
        return None
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if sampling.top_logprobs:
        values, ids = torch.topk(logprobs, min(sampling.top_logprobs, logprobs.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


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
    "TokenLogprob",
    "Usage",
    "normalise_weights",
]
