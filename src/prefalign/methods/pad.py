"""``pad``: Personalized Alignment at Decoding-time (Chen et al., ICLR 2025).

A personalised reward model (PRM, loaded under the engine's ``"prm"`` key) scores the
policy's next-token candidates. Both models read the chat through the ``pad``
guideline template. Per step, over the policy's top-``k`` candidates ``C``::

    r(y)     = log_softmax_C(PRM)[y] − log_softmax_C(policy)[y]     (token-level reward)
    score(y) = policy_logit(y) + w · r(y)        for y in C,   −inf outside C

the paper's ``new_scores = rewards * weight + prescreen_logits`` (zjuruizhechen/PAD,
``inference/PAD.py``). prefalign's extensions: ``plausibility`` (alias ``min_p``; 0 = the
paper's rule) drops candidates below that fraction of the policy favourite's
probability, the rule ``la`` and ``amulet`` share; ``candidate_template`` draws the
candidates from the policy under another template; several preferences combine as a
weighted sum of per-preference rewards. A PRM equal to the policy gives ``r = 0`` and the
tokens of method ``pref`` with template ``pad``.

How each rule works, the paper's weights, and how ``w`` and ``plausibility`` were tuned
for the shipped PRM: docs/prm.md ("PAD's rules and their tuning").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PrefalignError
from ..prompts import TEMPLATES
from .method import (
    POLICY,
    PRM,
    ContextRole,
    ContextScores,
    Method,
    count,
    fraction,
    plausibility_mask,
    positive,
)

__all__ = ["PRM", "Pad", "pad_scores"]


def pad_scores(
    base: torch.Tensor,
    policy: torch.Tensor,
    prm: torch.Tensor,
    weights: torch.Tensor,
    w: float,
    k: int,
    plausibility: float = 0.0,
) -> torch.Tensor:
    """PAD's combined scores.

    ``base``: ``[n, V]`` policy scores whose top-``k`` are the candidates;
    ``policy``/``prm``: ``[n, P, V]`` log-probs of the policy and the PRM under each
    preference; ``weights``: ``[P]`` positive. ``plausibility`` > 0 also drops candidates
    whose policy probability is below that fraction of the top candidate's
    (:func:`~prefalign.methods.method.plausibility_mask`). Returns ``[n, V]``,
    −inf off the candidates.
    """
    k = min(int(k), base.shape[-1])
    base_k, top = base.topk(k, dim=-1)  # [n, k], sorted: column 0 is the policy's favourite
    index = top[:, None, :].expand(-1, policy.shape[1], -1)
    policy_k = policy.gather(-1, index)
    prm_k = prm.gather(-1, index).to(policy_k.dtype)
    reward = torch.log_softmax(prm_k, dim=-1) - torch.log_softmax(policy_k, dim=-1)  # [n, P, k]
    # A candidate the policy rules out (−inf) has no defined reward; its score stays −inf.
    reward = torch.where(torch.isfinite(policy_k), reward, torch.zeros_like(reward))
    if reward.shape[1] == 1:
        total = reward[:, 0]
    else:
        share = (weights / weights.sum()).to(reward.dtype)
        total = torch.einsum("npk,p->nk", reward, share)
    combined = base_k + w * total
    # Rewards only differ by a per-row constant between candidate sets (the log-softmax
    # normaliser), so dropping candidates after scoring is the same as scoring over the
    # smaller set. base_k is sorted, so its max is column 0, the policy's favourite.
    combined = plausibility_mask(combined, base_k, plausibility)
    scores = torch.full_like(base, float("-inf"))
    return scores.scatter(-1, top, combined)


@dataclass(frozen=True)
class Pad(Method):
    """PAD with the paper's top-k (10), reward weight w = 1.6 and plausibility floor 0.2
    (both tuned for the shipped PRM, docs/prm.md; ``plausibility=0`` is the paper's rule).

    Needs a personalised reward model under the key ``"prm"`` (``Aligner.load_prm``,
    ``Aligner.from_pretrained(prm=...)``, CLI ``--prm PATH``; the embedded model has a
    shipped one). Several preferences: docs/prm.md.
    """

    name = "pad"
    summary = "PAD: policy + w · token-level reward of a personalised reward model (needs a PRM)"
    helps = "the model its PRM was trained for: with the shipped PRM on the embedded model it beat pref on 74 % of pairs on its own evaluation split but 54 % on prompts from another set (docs/prm.md)"
    default_template = "pad"
    #: ``min_p`` was this parameter's name before ``la`` and ``amulet``'s ``plausibility``
    #: (the same rule) gave it one name; old commands keep working.
    aliases = {"rm_weight": "w", "topk": "k", "min_p": "plausibility"}
    w: float = 1.6
    k: int = 10
    plausibility: float = 0.2
    candidate_template: str | None = None

    def __post_init__(self) -> None:
        positive("w", self.w, allow_zero=True)
        count("k", self.k, maximum=1000)
        fraction("plausibility", self.plausibility)
        if self.candidate_template is not None and self.candidate_template not in TEMPLATES:
            raise PrefalignError(
                f"candidate_template must be one of {', '.join(TEMPLATES)} (or unset for the paper's rule), "
                f"got {self.candidate_template!r}",
                field="candidate_template",
            )

    @property
    def extra_models(self) -> tuple[str, ...]:
        return (PRM,)

    def roles(self, n_preferences: int) -> list[ContextRole]:
        n = max(n_preferences, 1)
        roles = [ContextRole(i, POLICY) for i in range(n)] + [ContextRole(i, PRM) for i in range(n)]
        if self.candidate_template is not None:
            roles += [ContextRole(i, POLICY, template=self.candidate_template) for i in range(n)]
        return roles

    def primary_context(self, n_preferences: int) -> int:
        # The context whose candidates the answer is made of (of the first preference).
        return 2 * max(n_preferences, 1) if self.candidate_template is not None else 0

    def combine(self, scores: ContextScores) -> torch.Tensor:
        proposer = scores.candidates if self.candidate_template is not None else scores.preferences
        return pad_scores(
            scores.weighted(proposer),
            scores.preferences,
            scores.reward,
            scores.weights,
            float(self.w),
            self.k,
            float(self.plausibility),
        )
