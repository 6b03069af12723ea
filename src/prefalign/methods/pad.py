"""``pad``: Personalized Alignment at Decoding-time (Chen et al., ICLR 2025).

A personalised reward model (PRM, loaded under the engine's ``"prm"`` key) scores the
policy's next-token candidates. Both models read the chat through the ``pad``
guideline template (``[Guidelines] ... [Principles] <preference> [Instruction] ...``).
Per step, over the policy's top-``k`` candidates ``C``::

    r(y)     = log_softmax_C(PRM)[y] − log_softmax_C(policy)[y]     (token-level reward)
    score(y) = policy_logit(y) + w · r(y)        for y in C,   −inf outside C

which is the paper's ``new_scores = rewards * weight + prescreen_logits`` with
``rewards = log_softmax(dpo_logits[topk]) − log_softmax(ref_logits[topk])``
(zjuruizhechen/PAD, ``inference/PAD.py``). The engine hands methods log-softmax values,
which differ from logits by one constant per row: the same argmax and the same
sampling distribution. Greedy takes the argmax; with ``temperature=T`` the engine
samples ``softmax(score / T)`` over the candidates, as the paper's sampling mode
(T = 0.7 there).

**Weight** ``w`` (default 1.6). The scale of ``w`` depends on how far a PRM's
log-probabilities depart from the policy's, so it is tuned per PRM. The paper's
released configurations (P-Soups) use w = 0.8 for helpfulness, 0.8 for harmlessness
and 0.5 for humour (0.8 / 0.5 / 0.6 / 0.8 for the joined principles helpful+harmless /
harmless+humor / helpful+humor / all three), and 1.0 / 1.5 / 0.5 on HelpSteer2 (see
:data:`PAPER_WEIGHTS`); its grid search spans 0–1.5. prefalign's default, 1.6, was
chosen for the PRM shipped with the embedded model on 16 training-split prompts that
no PRM was trained on (sweep 0.8–4.0, docs/prm.md): larger weights win more often by
the proxy judges but drift off topic (relevance to the prompt falls, perplexity under
the base model rises). ``w = 0`` is plain top-``k`` decoding of the policy.

**Plausibility floor** ``min_p`` (prefalign's extension, default 0.2; ``min_p=0`` is
the paper's rule). Top-``k`` alone lets the reward promote a candidate the policy gives
0.1 % when its favourite has 90 %. With ``min_p > 0`` a candidate must also have at
least ``min_p`` times the probability of the policy's favourite (transformers'
``min_p`` rule, as in contrastive decoding's plausibility constraint, Li et al. 2023),
which bounds how far the reward can pull the answer from fluent text. On 32
development prompts with the shipped PRM, 0.2 kept PAD's win rate and lowered its
perplexity (docs/prm.md); larger floors cost effect.

**Candidates from another prompt** ``candidate_template`` (prefalign's extension,
default None = the paper's rule). PAD's guideline prompt changes what the policy says
even without a reward (on the embedded model its answers are already 33 % less likely
under the base context than the default template's). With ``candidate_template="default"``
the candidates and the ``policy_logit`` term come from a third context, the policy
reading the same preference through that template (what method ``pref`` decodes), while
the reward still compares the PRM with the policy under the guideline prompt, as in
the PRM's DPO training::

    score(y) = policy_default(y) + w · r_pad(y)     for y in top-k(policy_default)

It costs one more context per preference (3 rows per prompt instead of 2).

**Several preferences.** Two ways, documented in docs:

* *Joined principles (the paper's way):* one preference whose text names them all,
  e.g. the preset ``"pad:helpful+harmless"`` (``"harmless and helpfulness"``): one
  policy context and one PRM context, exactly the paper's decoding.
* *Weighted sum of per-preference rewards (prefalign's extension):* pass a list of
  preferences ``[(text_1, weight_1), ...]``. Each preference ``i`` gets its own policy
  context ``b_i`` and PRM context ``m_i`` (the reward of preference ``i`` must compare
  the PRM with the policy seeing the *same* text, as in the PRM's DPO training). The
  policy score is the weighted mean of the ``b_i`` (a product of experts, as method
  ``pref`` composes preferences); its top-``k`` give the candidates; then::

      score(y) = Σ_i ŵ_i b_i(y) + w · Σ_i ŵ_i r_i(y),   ŵ_i = weight_i / Σ_j weight_j

  with ``r_i`` computed as above from ``m_i`` and ``b_i`` on the shared candidates.
  With one preference this is the paper's rule; with equal weights the reward term is
  the mean reward. It costs 2·P contexts per prompt instead of 2.

A PRM equal to the policy gives ``r = 0`` exactly, and PAD then decodes the same
tokens as method ``pref`` with template ``pad`` (greedy), which the tests check.

**Execution.** The method only names its contexts and combines log-probs; the engine
runs the models. ``Aligner.load_prm`` registers the PRM by default as a
:class:`~prefalign.pad_fused.FusedPadModel`: one forward per step computes the policy's
and the PRM's rows together (the PRM's adapters touch its rows only), instead of two
forwards of separate weights (``load_prm(..., fused=False)``); see
``benchmarks/pad_speed.py``. Any causal LM with the policy's tokenizer also works as a
PRM under the ``"prm"`` key (``Aligner.add_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PrefalignError
from ..prompts import TEMPLATES
from .method import (
    POLICY,
    ContextRole,
    Method,
    count,
    fraction,
    positive,
    weighted_mean,
)

#: Engine key of the personalised reward model.
PRM = "prm"

#: The paper's reward weight per principle, from its released configurations
#: (zjuruizhechen/PAD ``inference/configs/{psoups,steers}_llama3SFT_*.config``; all top-k 10, greedy).
PAPER_WEIGHTS: dict[str, dict[str, float]] = {
    "psoups": {
        "helpful": 0.8, "harmless": 0.8, "humor": 0.5,
        "helpful+harmless": 0.8, "harmless+humor": 0.5, "helpful+humor": 0.6, "helpful+harmless+humor": 0.8,
    },
    "helpsteer2": {
        "helpful": 1.0, "harmless": 1.5, "humor": 0.5,
        "helpful+harmless": 0.8, "harmless+humor": 0.8, "helpful+humor": 0.5, "helpful+harmless+humor": 1.0,
    },
}


def pad_scores(
    base: torch.Tensor,
    policy: torch.Tensor,
    prm: torch.Tensor,
    weights: torch.Tensor,
    w: float,
    k: int,
    min_p: float = 0.0,
) -> torch.Tensor:
    """PAD's combined scores.

    ``base``: ``[n, V]`` policy scores whose top-``k`` are the candidates;
    ``policy``/``prm``: ``[n, P, V]`` log-probs of the policy and the PRM under each
    preference; ``weights``: ``[P]`` positive. ``min_p`` > 0 also drops candidates whose
    policy probability is below ``min_p`` times the top candidate's. Returns ``[n, V]``,
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
    if min_p > 0:
        # Rewards only differ by a per-row constant between candidate sets (the
        # log-softmax normaliser), so dropping candidates after scoring is the same as
        # scoring over the smaller set.
        implausible = base_k < base_k[:, :1] + math.log(min_p)
        combined = combined.masked_fill(implausible, float("-inf"))
    scores = torch.full_like(base, float("-inf"))
    return scores.scatter(-1, top, combined)


@dataclass(frozen=True)
class Pad(Method):
    """PAD with the paper's top-k (10), reward weight w = 1.6 and plausibility floor min_p = 0.2
    (both tuned for the shipped PRM; ``min_p=0`` is the paper's rule).

    Needs a personalised reward model under the key ``"prm"`` (``Aligner.load_prm``,
    ``Aligner.from_pretrained(prm=...)``, CLI ``--prm PATH``; the embedded model has a
    shipped one). Several preferences: see the module docs.
    """

    name = "pad"
    summary = "PAD: policy + w · token-level reward of a personalised reward model (needs a PRM)"
    helps = "the model its PRM was trained for: with the shipped PRM on the embedded model it beat pref on 74 % of pairs on its own evaluation split but 54 % on prompts from another set (docs/prm.md)"
    default_template = "pad"
    w: float = 1.6
    k: int = 10
    min_p: float = 0.2
    candidate_template: str | None = None

    def __post_init__(self) -> None:
        positive("w", self.w, allow_zero=True)
        count("k", self.k, maximum=1000)
        fraction("min_p", self.min_p)
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

    def combine(self, logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_prefs = weights.shape[0]
        policy, prm = logprobs[:, :n_prefs], logprobs[:, n_prefs : 2 * n_prefs]
        proposer = logprobs[:, 2 * n_prefs :] if self.candidate_template is not None else policy
        return pad_scores(
            weighted_mean(proposer, weights), policy, prm, weights, float(self.w), self.k, float(self.min_p)
        )
