"""The contrastive methods' shared rule and its safeguard: a per-token strength under a KL budget.

``la`` and ``amulet`` both score ``p + c·(p − b)`` with a fixed strength ``c`` (``ratio``,
or Amulet's ``c_T``). On a model where ``p − b`` is mostly noise, a fixed ``c`` promotes
tokens neither context finds plausible and the answer turns into word salad. The
safeguard caps the strength *per token*: the largest ``c ≤ c_max`` with::

    KL(softmax(p + c·(p − b)) ‖ softmax(p)) ≤ ε

i.e. the realigned distribution may move at most ``ε`` nats away from the preference
context's own. Where the two contexts agree on what is plausible, the KL stays small and
the full strength is kept; where amplifying would jump to an implausible token, the
strength shrinks for that token only.

With ``q_c = softmax(p + c·d)``, ``d = p − b`` and ``p`` normalised,
``KL(c) = c·E_q[d] − log Σ exp(p + c·d)`` and ``dKL/dc = c·Var_q(d) ≥ 0``: the KL is
non-decreasing in ``c``, so bisection on ``[0, c_max]`` finds the bound (vectorised over
rows, a fixed number of steps, so the cost per token is fixed and rows never influence
each other).

Repetition awareness (``repeat_ngram`` = n > 0): a token that would complete an n-gram
the answer already contains gets no amplification: its contrast ``p − b`` is replaced by
``min(p − b, 0)`` before the strength is searched and applied, so the realigned score of a
repeat is never above the preference context's own. Amplifying ``p − b`` otherwise
feeds loops ("alright, alright, alright, ...") that the KL bound alone lets through.
"""

from __future__ import annotations

from typing import Any

import torch

from .method import count, positive

#: Default KL budgets (nats); 0 turns the safeguard off (the papers' rules). Measured in
#: docs/safeguard.md: on the embedded model (8 prompts × 4 preferences, 96 tokens) Amulet
#: collapsed in 28/32 answers at the paper's rule, 2/32 at 0.25 and 0.5 (pref: 1/32), 7/32
#: at 1; la 10/32 → 2/32 at 0.25, 3/32 at 0.5. On the 1.5B probe (12 pairs) Amulet at 0.5
#: kept the paper's 7 wins over pref with 0 losses (0.25: 4 wins, 2 losses), 2/12 collapsed
#: against the paper rule's 7/12.
AMULET_KL_BUDGET = 0.5
LA_KL_BUDGET = 0.25

#: Default n of the repetition guard (0 = off). On development prompts (HelpSteer, 24 answers)
#: Amulet collapsed in 4/24 with n = 3 against 7/24 off; held out (45 answers) 33 % against 40 %
#: (la 31 % against 40 %; pref 22 %): docs/results/by-model.md.
REPEAT_NGRAM = 3
MAX_REPEAT_NGRAM = 16

#: Largest accepted budget: only a guard against nonsense values (at 2 nats the embedded model
#: already collapses in 19 of 32 answers, against 28 with no bound).
MAX_KL_BUDGET = 100.0

#: Bisection steps: the bound is found to within ``c_max / 2**STEPS`` (0.07 at Amulet's c_T = 4.65);
#: each step is one softmax over the vocabulary per row.
STEPS = 6


_LOG_Q_FLOOR = -80.0
_BANNED = -1e4
_CHUNK_ELEMENTS = 1 << 16


def check_repeat_ngram(value: int) -> None:
    """Reject a ``repeat_ngram`` outside ``[0, MAX_REPEAT_NGRAM]`` (0 = off), naming the field."""
    count("repeat_ngram", value, minimum=0, maximum=MAX_REPEAT_NGRAM)


def guard_repeats(pref: torch.Tensor, base: torch.Tensor, repeats: tuple[list[int], list[int]] | None) -> torch.Tensor:
    """``base`` raised to ``pref`` on the ``(rows, tokens)`` of ``repeats`` (tokens that would
    complete an n-gram already in the row's answer) where ``pref > base``: the contrast
    ``pref − base`` of those tokens becomes ``min(pref − base, 0)``.

    ``pref`` ``[n, P, V]``, ``base`` ``[n, 1, V]``; returns ``base`` itself when nothing is
    marked, else a copy ``[n, P, V]`` changed at those entries only.
    """
    if not repeats or not repeats[0]:
        return base
    rows = torch.tensor(repeats[0], device=pref.device)
    tokens = torch.tensor(repeats[1], device=pref.device)
    guarded = base.expand_as(pref).clone()
    guarded[rows, :, tokens] = torch.maximum(guarded[rows, :, tokens], pref[rows, :, tokens])
    return guarded


def repeats_of(n: int, scores: Any) -> tuple[list[int], list[int]] | None:
    """(rows, tokens) that would complete an n-gram already in each row's answer (from the
    engine's ``scores.history``); None when the guard is off or no history is given."""
    history = getattr(scores, "history", None)
    if n <= 0 or history is None:
        return None
    return history.repeat_pairs(n, scores.logprobs.shape[-1])


def check_kl_budget(value: float) -> None:
    """Reject a KL budget outside ``[0, MAX_KL_BUDGET]`` (0 = safeguard off), naming the field."""
    positive("kl_budget", value, allow_zero=True, maximum=MAX_KL_BUDGET)


def _kl_from_preference(pref: torch.Tensor, delta: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p + c·d) ‖ softmax(p))`` per row (``[..., 1]``); ``pref`` is a log-softmax."""
    # ``delta * strength``, not ``strength * delta``: the same product (multiplication
    # commutes exactly), but a broadcast first operand takes a slow path (~5x on a CPU).
    log_q = torch.log_softmax(pref + delta * strength, dim=-1)
    # exp of log-probs below about -87 yields float32 subnormals, which are ~15x slower on
    # CPUs; tokens that unlikely (q < 2e-35) add nothing measurable to the KL.
    q = log_q.clamp_min(_LOG_Q_FLOOR).exp()
    return (q * (log_q - pref)).sum(dim=-1, keepdim=True)


def kl_bounded_strength(pref: torch.Tensor, base: torch.Tensor, max_strength: float, budget: float, *, steps: int = STEPS) -> torch.Tensor:
    """The largest ``c ∈ [0, max_strength]`` per row with ``KL(softmax(p + c(p−b)) ‖ softmax(p)) ≤ budget``.

    ``pref`` and ``base`` are log-softmaxes ``[..., V]`` (same shape, or ``base``
    broadcastable); returns ``[..., 1]`` in ``pref``'s dtype. Rows whose KL at
    ``max_strength`` is within the budget get exactly ``max_strength``; the others the
    lower end of a ``steps``-step bisection bracket, so the returned strength always
    satisfies the budget (up to float rounding of the KL).
    """
    if budget <= 0:
        raise ValueError(f"kl_bounded_strength needs a positive budget, got {budget}")
    shape = (*pref.shape[:-1], 1)
    if max_strength <= 0:
        return torch.full(shape, float(max_strength), dtype=pref.dtype, device=pref.device)
    vocab = pref.shape[-1]
    rows_p = pref.reshape(-1, vocab)
    rows_b = base.expand_as(pref).reshape(-1, vocab)
    if pref.device.type != "cpu":
        # On an accelerator: all rows at once, a fixed number of kernels, no host sync.
        return _bounded_rows(rows_p, rows_b, float(max_strength), budget, steps, early_exit=False).reshape(shape)
    # On a CPU: a few rows at a time: each search step makes ~7 passes over [rows, V], and
    # keeping them in cache is 2-2.5x faster at batch 8 than one pass over all rows; a
    # chunk whose rows all keep the full strength skips the search (a host check is free here).
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    parts = [
        _bounded_rows(rows_p[i : i + chunk], rows_b[i : i + chunk], float(max_strength), budget, steps)
        for i in range(0, rows_p.shape[0], chunk)
    ]
    return torch.cat(parts).reshape(shape)


def _bounded_rows(
    pref: torch.Tensor, base: torch.Tensor, max_strength: float, budget: float, steps: int, *, early_exit: bool = True
) -> torch.Tensor:
    """:func:`kl_bounded_strength` on ``[rows, V]``; returns ``[rows, 1]``. Rows are
    independent: the answer does not depend on ``early_exit`` or on the other rows."""
    # A token banned with -inf (e.g. by a transformers logits processor) would make the KL
    # NaN (0·(−inf − −inf)); at -1e4 it keeps probability 0 and every term stays finite.
    pref = pref.clamp_min(_BANNED)
    delta = pref - base.clamp_min(_BANNED)
    top = torch.full((pref.shape[0], 1), max_strength, dtype=pref.dtype, device=pref.device)
    within = _kl_from_preference(pref, delta, top) <= budget
    if early_exit and bool(within.all()):  # the contexts agree on every row: no search
        return top
    low = torch.zeros_like(top)
    high = top.clone()
    for _ in range(steps):
        mid = (low + high) * 0.5
        ok = _kl_from_preference(pref, delta, mid) <= budget
        low = torch.where(ok, mid, low)
        high = torch.where(ok, high, mid)
    return torch.where(within, top, low)


def contrast(pref: torch.Tensor, base: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """``p + c·(p − b)`` for a scalar or per-row ``c`` (``[..., 1]``), written ``(1 + c)·p − c·b``.

    That form keeps a token the preference context bans (``p = −inf``, ``b`` finite) at −inf
    for every ``c ≥ 0``; ``p + c·(p − b)`` and ``lerp(b, p, 1 + c)`` give NaN there at ``c = 0``.
    """
    # The big tensor first: a broadcast first operand takes a slow path (~5x on a CPU);
    # the products are the same bits (multiplication commutes exactly).
    # In place where it can be: each [rows, V] temporary is fresh memory to fault in.
    out = pref * (1.0 + strength)
    return out.sub_(base * strength)
