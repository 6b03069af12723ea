"""DPO training of a personalised reward model (``prefalign train-prm``).

Objective (Rafailov et al. 2023, as PAD trains its PRM): for a pair (chosen ``y+``,
rejected ``y−``) of answers to prompt ``x`` under preference ``p``::

    r(y) = β · (log π_PRM(y | x, p) − log π_ref(y | x, p))
    loss = −log σ(r(y+) − r(y−))

``log π(y | x, p)`` is the sum of the answer tokens' log-probabilities after the
``pad``-template prompt. The reference is the frozen policy, computed as the PRM with
adapters disabled and the identity linear layer (bit-identical to the policy, tested),
once per pair before training and cached with the checkpoints.

Why not trl's ``DPOTrainer``: the PRM is not a ``PreTrainedModel``/``PeftModel`` (a
backbone with injected LoRA, an extra ``Linear(d, d)`` and the policy's head), its
prompts are rendered by prefalign's own ``pad`` template, and the reference is the
same module with adapters off; DPOTrainer's tokenisation, reference-model handling
and Trainer/accelerate machinery would need overriding at every one of these points,
for a loss that is one line. So the loop below is self-contained: seeded, with a
held-out split (by prompt), checkpoints every N steps, ``resume``, a time budget,
and Ctrl-C/SIGTERM saving a checkpoint before exiting.

Reported metrics (held-out pairs): *reward accuracy* (share of pairs with
``r(y+) > r(y−)``, ties counted half; the untrained PRM equals the reference so
every pair ties: 0.5) and *reward margin* (mean ``r(y+) − r(y−)``), overall and per
preference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..compat import cache_kwargs
from ..errors import PrefalignError
from .config import CHECKPOINT_NAME, TrainConfig, require_checkpoint  # TrainConfig, CHECKPOINT_NAME re-exported: prefalign.prm.train.X
from .data import (
    PairExample,
    encode_pairs,
    examples_digest,
    load_pair_rows,
    split_pairs,
)
from .io import build_from_layout, lora_layout
from .model import PersonalizedRewardModel, build_prm

log = logging.getLogger(__name__)

REFERENCE_NAME = "reference_logps.pt"


# --- log-probabilities ---------------------------------------------------------------


def _autocast(enabled: bool, device: torch.device) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sequence_logps(
    prm: PersonalizedRewardModel,
    sequences: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    bf16: bool = False,
) -> torch.Tensor:
    """Sum of answer-token log-probs for each ``(prompt_ids, answer_ids)`` (differentiable).

    Right-padded batch; the LM head runs only on positions that predict answer tokens.
    """
    device = prm.device
    lengths = [len(p) + len(a) for p, a in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    rows, positions, targets = [], [], []
    for r, (p, a) in enumerate(sequences):
        seq = p + a
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        mask[r, : len(seq)] = 1
        for j in range(len(a)):
            rows.append(r)
            positions.append(len(p) - 1 + j)
            targets.append(a[j])
    row_t = torch.tensor(rows, device=device)
    with _autocast(bf16, device):
        hidden = prm.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = prm.hidden_to_logits(hidden[row_t, torch.tensor(positions, device=device)])
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    out = torch.zeros(len(sequences), dtype=torch.float32, device=device)
    return out.index_add(0, row_t, logps)


def shared_prefix_logps(
    prm: PersonalizedRewardModel, example: PairExample, *, pad_id: int, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of one pair, running the shared prompt only once.

    The prompt goes through the backbone once (with gradients); its KV cache is
    repeated for the two answers, which run as a right-padded batch of two. About
    30 % fewer tokens than two full sequences for typical prompt/answer lengths.
    """
    from transformers import DynamicCache

    device = prm.device
    prompt = torch.tensor([example.prompt_ids], dtype=torch.long, device=device)
    answers = [example.chosen_ids, example.rejected_ids]
    width = max(len(a) for a in answers)
    p_len = prompt.shape[1]
    ids = torch.full((2, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((2, p_len + width), dtype=torch.long, device=device)
    mask[:, :p_len] = 1
    for r, a in enumerate(answers):
        ids[r, : len(a)] = torch.tensor(a, dtype=torch.long, device=device)
        mask[r, p_len : p_len + len(a)] = 1
    with _autocast(bf16, device):
        cache = DynamicCache(config=prm.config)
        into_cache = cache_kwargs(prm.backbone, cache)
        first = prm.backbone(input_ids=prompt, use_cache=True, **into_cache).last_hidden_state[:, -1]
        cache.batch_repeat_interleave(2)
        positions = torch.arange(p_len, p_len + width, device=device)[None].expand(2, -1)
        hidden = prm.backbone(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **into_cache
        ).last_hidden_state
        # Answer token j is predicted by the prompt's last state (j = 0) or answer state j - 1.
        rows, cols, targets = [], [], []
        for r, a in enumerate(answers):
            for j in range(1, len(a)):
                rows.append(r)
                cols.append(j - 1)
                targets.append(a[j])
        row_t = torch.tensor(rows, dtype=torch.long, device=device)
        states = torch.cat([first.expand(2, -1), hidden[row_t, torch.tensor(cols, dtype=torch.long, device=device)]])
        logits = prm.hidden_to_logits(states)
    first_targets = [answers[0][0], answers[1][0]]
    all_targets = torch.tensor(first_targets + targets, dtype=torch.long, device=device)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, all_targets[:, None])[:, 0]
    out = logps[:2].clone()
    return out[0:1] + logps[2:][row_t == 0].sum(), out[1:2] + logps[2:][row_t == 1].sum()


def pair_logps(
    prm: PersonalizedRewardModel, pairs: Sequence[PairExample], *, pad_id: int, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs of ``pairs``.

    One pair: the shared-prompt path (:func:`shared_prefix_logps`); several: one
    right-padded batch of full sequences.
    """
    if len(pairs) == 1:
        return shared_prefix_logps(prm, pairs[0], pad_id=pad_id, bf16=bf16)
    seqs = [(e.prompt_ids, e.chosen_ids) for e in pairs] + [(e.prompt_ids, e.rejected_ids) for e in pairs]
    out = sequence_logps(prm, seqs, pad_id=pad_id, bf16=bf16)
    return out[: len(pairs)], out[len(pairs) :]


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (mean) and the per-pair rewards of chosen and rejected."""
    r_c = beta * (chosen - ref_chosen)
    r_r = beta * (rejected - ref_rejected)
    return -F.logsigmoid(r_c - r_r).mean(), r_c.detach(), r_r.detach()


@torch.no_grad()
def reference_logps(
    prm: PersonalizedRewardModel, examples: Sequence[PairExample], *, pad_id: int, bf16: bool, micro_batch: int, bar: Any = None
) -> dict[int, tuple[float, float]]:
    """Reference (policy) log-probs of every pair: the PRM with adapters disabled."""
    out: dict[int, tuple[float, float]] = {}
    with prm.adapters_disabled():
        for i in range(0, len(examples), micro_batch):
            chunk = examples[i : i + micro_batch]
            c, r = pair_logps(prm, chunk, pad_id=pad_id, bf16=bf16)
            for e, cc, rr in zip(chunk, c.tolist(), r.tolist()):
                out[e.index] = (cc, rr)
            if bar is not None:
                bar.update(len(chunk))
    return out


@torch.no_grad()
def evaluate(
    prm: PersonalizedRewardModel,
    examples: Sequence[PairExample],
    refs: dict[int, tuple[float, float]],
    *,
    beta: float,
    pad_id: int,
    bf16: bool,
    micro_batch: int,
) -> dict[str, Any]:
    """Reward accuracy (ties count half), strict accuracy and mean margin, overall and per preference."""
    if not examples:
        return {"pairs": 0}
    margins: list[tuple[str, float]] = []
    losses = []
    for i in range(0, len(examples), micro_batch):
        chunk = examples[i : i + micro_batch]
        c, r = pair_logps(prm, chunk, pad_id=pad_id, bf16=bf16)
        rc = torch.tensor([refs[e.index][0] for e in chunk])
        rr = torch.tensor([refs[e.index][1] for e in chunk])
        loss, r_c, r_r = dpo_loss(c.cpu(), r.cpu(), rc, rr, beta)
        losses.append(loss.item() * len(chunk))
        margins.extend((e.preference, m) for e, m in zip(chunk, (r_c - r_r).tolist()))
    return _summarise(margins, sum(losses) / len(examples))


def _summarise(margins: Sequence[tuple[str, float]], loss: float | None = None) -> dict[str, Any]:
    def stats(ms: list[float]) -> dict[str, float]:
        wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in ms)
        return {
            "pairs": len(ms),
            "accuracy": round(wins / len(ms), 4),
            "strict_accuracy": round(sum(m > 0 for m in ms) / len(ms), 4),
            "margin": round(sum(ms) / len(ms), 4),
        }

    if not margins:  # no held-out split (held_out=0, or a single prompt)
        return {"pairs": 0}
    out: dict[str, Any] = stats([m for _, m in margins])
    if loss is not None:
        out["loss"] = round(loss, 4)
    by: dict[str, list[float]] = {}
    for pref, m in margins:
        by.setdefault(pref, []).append(m)
    out["per_preference"] = {p: stats(ms) for p, ms in sorted(by.items())}
    return out


def likelihood_baseline(examples: Sequence[PairExample], refs: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """How often the preference-conditioned *policy* already ranks chosen above rejected.

    Per-token mean log-prob (length-normalised; summed log-probs favour short answers
    for any preference). A PRM that only reproduced the policy would score this.
    """
    margins = []
    for e in examples:
        c, r = refs[e.index]
        margins.append((e.preference, c / len(e.chosen_ids) - r / len(e.rejected_ids)))
    return _summarise(margins)


# --- checkpoints ---------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _trainable_state(prm: PersonalizedRewardModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in prm.named_parameters() if p.requires_grad}


def _load_trainable_state(prm: PersonalizedRewardModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(prm.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise PrefalignError(f"checkpoint does not match this PRM (missing {missing[:3]})", field="resume")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _order(n: int, epoch: int, seed: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


def _plan(train_set: Sequence[PairExample], batch_size: int, epochs: float, seed: int, group_by_prompt: bool) -> list[list[int]]:
    """Training-set indices of every optimiser step, epoch after epoch (deterministic).

    ``group_by_prompt``: a step holds whole prompt groups (packed up to ``batch_size``
    pairs; a larger group is a step of its own). A prompt's pairs for opposite
    preferences are mirror images (concise's chosen is verbose's rejected); in one step
    their preference-independent gradients cancel and only what depends on the
    preference text remains. Without it, steps are seeded random chunks.
    """
    n_epochs = max(1, math.ceil(epochs))
    per_epoch: list[list[list[int]]] = []
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(train_set):
        groups.setdefault(e.group, []).append(i)
    for epoch in range(n_epochs):
        steps: list[list[int]] = []
        if group_by_prompt:
            keys = sorted(groups)
            random.Random(seed * 1_000_003 + epoch).shuffle(keys)
            batch: list[int] = []
            for key in keys:
                members = groups[key]
                if batch and len(batch) + len(members) > batch_size:
                    steps.append(batch)
                    batch = []
                batch = batch + members
            if batch:
                steps.append(batch)
        else:
            order = _order(len(train_set), epoch, seed)
            steps = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        per_epoch.append(steps)
    whole = int(epochs)
    plan = [s for steps in per_epoch[:whole] for s in steps]
    if epochs > whole:
        plan += per_epoch[whole][: max(1, round((epochs - whole) * len(per_epoch[whole])))]
    return plan or per_epoch[0][:1]


class _Interrupt:
    """Turn SIGTERM into KeyboardInterrupt while training (Ctrl-C already is one)."""

    def __enter__(self) -> _Interrupt:  # noqa: PYI034
        self.previous = None
        if sys.platform != "win32":
            try:
                self.previous = signal.signal(signal.SIGTERM, self._raise)
            except ValueError:  # not in the main thread
                self.previous = None
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# --- the loop ------------------------------------------------------------------------


@dataclass
class _Run:
    """What one :func:`train` call works on: the data, the model and optimiser, and the
    progress a checkpoint saves (``step``, ``history``, ``before``, ``train_seconds``)."""

    config: TrainConfig
    started: float
    policy: Any
    tokenizer: Any
    pad_id: int
    rows: list[dict[str, Any]]
    examples: list[PairExample]
    dropped: Any
    train_set: list[PairExample]
    eval_set: list[PairExample]
    digest: str
    preferences: list[str]
    prm: PersonalizedRewardModel | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    plan: list[list[int]] = field(default_factory=list)
    steps_per_epoch: int = 0
    warmup: int = 1
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] | None = None
    train_seconds: float = 0.0
    refs: dict[int, tuple[float, float]] | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.config.checkpoint_path()

    @property
    def ckpt_file(self) -> Path:
        return self.ckpt_dir / CHECKPOINT_NAME

    @property
    def ref_file(self) -> Path:
        return self.ckpt_dir / REFERENCE_NAME

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    def evaluate(self, examples: Sequence[PairExample]) -> dict[str, Any]:
        c = self.config
        assert self.prm is not None and self.refs is not None
        return evaluate(self.prm, examples, self.refs, beta=c.beta, pad_id=self.pad_id, bf16=c.bf16, micro_batch=c.micro_batch)

    def save_checkpoint(self) -> None:
        assert self.prm is not None
        _atomic_save(
            {
                "step": self.step,
                "digest": self.digest,
                "trainable": _trainable_state(self.prm),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": self.history,
                "before": self.before,
                "train_seconds": self.train_seconds,
                "lora_layout": lora_layout(self.prm),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            },
            self.ckpt_file,
        )


def train(config: TrainConfig, *, policy: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train a PRM per ``config``; saves it to ``config.output`` and returns the report.

    ``policy``/``tokenizer`` may be given (tests, notebooks); otherwise ``config.model``
    is loaded. The report has ``status`` ``"done"``, ``"time_budget"`` (stopped early,
    still evaluated and saved), ``"stopped"`` (``stop_after_steps``; checkpoint only)
    or ``"interrupted"`` (Ctrl-C/SIGTERM; checkpoint only — rerun with ``--resume``).

    The steps: check the config, load the policy and the pairs (:func:`_prepare`), build
    the PRM and its optimiser (:func:`_build`), resume a checkpoint (:func:`_resume`),
    compute the reference log-probs (:func:`_reference`), run the DPO steps
    (:func:`_run_steps`), then evaluate and save (:func:`_finish`).
    """
    started = time.monotonic()
    _check_config(config)
    run = _prepare(config, policy, tokenizer, started)
    _build(run)
    if config.resume:
        _resume(run)
    report = _data_report(run)
    log.info("pairs: %s", report["data"])
    with _Interrupt():
        try:
            _reference(run)
            budget_hit, stopped = _run_steps(run)
        except KeyboardInterrupt:
            saved = run.refs is not None
            if saved:
                run.save_checkpoint()
            report.update(status="interrupted", step=run.step, checkpoint=str(run.ckpt_file) if saved else None)
            where = f"checkpoint saved to {run.ckpt_file}" if saved else "nothing to save yet"
            print(f"\ninterrupted at step {run.step}; {where}; rerun with --resume", file=sys.stderr)
            return report
    report["steps"] = {
        "done": run.step, "total": run.total_steps, "per_epoch": run.steps_per_epoch,
        "epochs_done": round(sum(len(b) for b in run.plan[: run.step]) / len(run.train_set), 3),
    }
    if stopped:
        report.update(status="stopped", checkpoint=str(run.ckpt_file))
        return report
    return _finish(run, report, budget_hit)


def _check_config(config: TrainConfig) -> None:
    if config.batch_size < 1 or config.micro_batch < 1:
        raise PrefalignError("batch_size and micro_batch must be ≥ 1", field="batch_size")
    if config.beta <= 0:
        raise PrefalignError(f"beta must be > 0, got {config.beta}", field="beta")


def _prepare(config: TrainConfig, policy: Any, tokenizer: Any, started: float) -> _Run:
    """Seed, load the policy (unless given) and encode and split the pairs."""
    from ..models import load_model, prepare_tokenizer

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if policy is None:
        policy, tokenizer = load_model(config.model)
    elif tokenizer is None:
        raise PrefalignError("pass the policy's tokenizer with the policy", field="tokenizer")
    prepare_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = load_pair_rows(config.data)
    examples, dropped = encode_pairs(
        rows, tokenizer, template=config.template,
        max_prompt_tokens=config.max_prompt_tokens, max_answer_tokens=config.max_answer_tokens,
    )
    train_set, eval_set = split_pairs(examples, config.held_out, config.seed)
    return _Run(
        config=config, started=started, policy=policy, tokenizer=tokenizer, pad_id=pad_id, rows=rows,
        examples=examples, dropped=dropped, train_set=train_set, eval_set=eval_set,
        digest=examples_digest(examples), preferences=sorted({e.preference for e in examples}),
    )


def _build(run: _Run) -> None:
    """The PRM (untrained, or ``init_from``), AdamW, the step plan and the LR schedule."""
    config = run.config
    if config.init_from:
        from .io import load_prm_for_training

        prm = load_prm_for_training(config.init_from, run.policy, run.tokenizer)
    else:
        prm = build_prm(
            run.policy, lora_r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
            layers=_top_layers(run.policy, config.lora_top_layers),
        )
    run.prm = prm
    run.params = prm.trainable_parameters()
    linear_params = [prm.linear.weight]
    other_params = [p for p in run.params if p is not prm.linear.weight]
    run.optimizer = torch.optim.AdamW(
        [
            {"params": other_params, "lr": config.lr},
            {"params": linear_params, "lr": config.lr * config.linear_lr_scale},
        ],
        weight_decay=config.weight_decay,
    )
    run.plan = _plan(run.train_set, config.batch_size, config.epochs, config.seed, config.group_by_prompt)
    run.steps_per_epoch = len(_plan(run.train_set, config.batch_size, 1, config.seed, config.group_by_prompt))
    total_steps = run.total_steps
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, min(10, total_steps // 10))
    run.warmup = warmup

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, schedule)


def _resume(run: _Run) -> None:
    """Load the checkpoint's weights, optimiser, schedule, RNG and progress (same data only)."""
    ckpt_file = run.ckpt_file
    require_checkpoint(ckpt_file)
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    if ckpt.get("digest") != run.digest:
        raise PrefalignError(
            f"--resume: the checkpoint at {ckpt_file} was made for other data or tokenisation "
            f"(digest {ckpt.get('digest')} vs {run.digest})",
            field="resume",
        )
    assert run.prm is not None
    _load_trainable_state(run.prm, ckpt["trainable"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["torch_rng"])
    run.step = int(ckpt["step"])
    run.history = list(ckpt.get("history", []))
    run.before = ckpt.get("before")
    run.train_seconds = float(ckpt.get("train_seconds", 0.0))
    log.info("resumed at step %d/%d", run.step, run.total_steps)


def _data_report(run: _Run) -> dict[str, Any]:
    """The report as training starts: what the pairs are and how they were split."""
    examples, train_set, eval_set = run.examples, run.train_set, run.eval_set
    return {
        "status": "running",
        "data": {
            "file": str(run.config.data),
            "rows": len(run.rows),
            "pairs": len(examples),
            "dropped": run.dropped,
            "train_pairs": len(train_set),
            "held_out_pairs": len(eval_set),
            "train_prompts": len({e.group for e in train_set}),
            "held_out_prompts": len({e.group for e in eval_set}),
            "per_preference": {p: sum(e.preference == p for e in examples) for p in run.preferences},
            "mean_prompt_tokens": round(sum(len(e.prompt_ids) for e in examples) / len(examples), 1),
            "mean_answer_tokens": round(
                sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples) / (2 * len(examples)), 1
            ),
        },
        "digest": run.digest,
    }


def _reference(run: _Run) -> None:
    """Reference log-probs (computed once, cached beside the checkpoints) and the held-out "before"."""
    from tqdm import tqdm

    config = run.config
    assert run.prm is not None
    if run.ref_file.is_file():
        cached = torch.load(run.ref_file, map_location="cpu", weights_only=False)
        if cached.get("digest") == run.digest and cached.get("bf16") == config.bf16:
            run.refs = cached["refs"]
    if run.refs is None:
        bar = tqdm(total=len(run.examples), desc="reference log-probs", unit="pair", disable=not config.progress, file=sys.stderr)
        run.refs = reference_logps(run.prm, run.examples, pad_id=run.pad_id, bf16=config.bf16, micro_batch=config.micro_batch, bar=bar)
        bar.close()
        _atomic_save({"digest": run.digest, "bf16": config.bf16, "refs": run.refs}, run.ref_file)
    if run.before is None:
        if config.measure_before or config.init_from:
            run.before = run.evaluate(run.eval_set)
        else:
            run.before = {**_summarise([(e.preference, 0.0) for e in run.eval_set], math.log(2)), "derived": True}
        run.save_checkpoint()


def _run_steps(run: _Run) -> tuple[bool, bool]:
    """The DPO steps still to do; returns (time budget hit, stopped by ``stop_after_steps``)."""
    from tqdm import tqdm

    config = run.config
    assert run.prm is not None
    run.prm.train()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="DPO", unit="step", disable=not config.progress, file=sys.stderr)
    budget_hit = False
    stopped = False
    for steps_this_call, indices in enumerate(run.plan[run.step :]):  # a resumed run skips what it already did
        if config.time_budget_s is not None and time.monotonic() - run.started > config.time_budget_s:
            budget_hit = True
            break
        if config.stop_after_steps is not None and steps_this_call >= config.stop_after_steps:
            stopped = True
            break
        entry = _train_step(run, [run.train_set[i] for i in indices])
        run.history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=entry["loss"], acc=entry["accuracy"], margin=entry["margin"])
        if run.step % config.checkpoint_every == 0:
            run.save_checkpoint()
    bar.close()
    run.prm.eval()
    run.save_checkpoint()
    return budget_hit, stopped


def _train_step(run: _Run, batch: list[PairExample]) -> dict[str, Any]:
    """One optimiser step over ``batch`` (in micro-batches); returns its history entry."""
    config = run.config
    assert run.prm is not None and run.refs is not None
    t0 = time.monotonic()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, margins = 0.0, []
    for j in range(0, len(batch), config.micro_batch):
        chunk = batch[j : j + config.micro_batch]
        c, r = pair_logps(run.prm, chunk, pad_id=run.pad_id, bf16=config.bf16)
        rc = torch.tensor([run.refs[e.index][0] for e in chunk], device=c.device)
        rr = torch.tensor([run.refs[e.index][1] for e in chunk], device=c.device)
        loss, r_c, r_r = dpo_loss(c, r, rc, rr, config.beta)
        (loss * len(chunk) / len(batch)).backward()
        loss_sum += loss.item() * len(chunk)
        margins.extend((r_c - r_r).tolist())
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    run.train_seconds += time.monotonic() - t0
    return {
        "step": run.step,
        "loss": round(loss_sum / len(batch), 4),
        "accuracy": round(sum(m > 0 for m in margins) / len(margins), 3),
        "margin": round(sum(margins) / len(margins), 4),
        "lr": run.scheduler.get_last_lr()[0],
    }


#: The settings the report records as hyperparameters.
_HYPERPARAMETERS = (
    "beta", "lr", "linear_lr_scale", "lora_top_layers", "group_by_prompt", "epochs", "batch_size", "micro_batch",
    "lora_r", "lora_alpha", "held_out", "max_prompt_tokens", "max_answer_tokens", "bf16", "seed", "weight_decay",
    "max_grad_norm", "init_from", "template",
)


def _finish(run: _Run, report: dict[str, Any], budget_hit: bool) -> dict[str, Any]:
    """Evaluate the trained PRM, complete the report, save the PRM and the report."""
    from ..models import tokenizer_fingerprint

    config = run.config
    assert run.prm is not None and run.refs is not None
    after = run.evaluate(run.eval_set)
    train_after = run.evaluate(run.train_set[: min(len(run.train_set), 32)])
    report.update(
        status="time_budget" if budget_hit else "done",
        held_out_before=run.before,
        held_out_after=after,
        train_subset_after=train_after,
        policy_likelihood_baseline=likelihood_baseline(run.eval_set, run.refs),
        hyperparameters={
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k in _HYPERPARAMETERS
        },
        warmup_steps=run.warmup,
        trainable_parameters=sum(p.numel() for p in run.params),
        train_seconds=round(run.train_seconds, 1),
        seconds_per_step=round(run.train_seconds / max(1, run.step), 2),
        wall_seconds_this_run=round(time.monotonic() - run.started, 1),
        history_tail=run.history[-5:],
        command=config.command,
        torch_threads=torch.get_num_threads(),
        tokenizer_fingerprint=tokenizer_fingerprint(run.tokenizer),
    )
    base_name = str(getattr(run.policy.config, "name_or_path", None) or config.model)
    if config.model == "embedded":
        base_name = "embedded:SmolLM2-135M-Instruct"
    from .io import save_prm

    save_prm(
        run.prm, config.output, run.tokenizer, base_model_name=base_name, preferences=run.preferences,
        extra={"training": report}, dtype=config.save_dtype, template=config.template,
    )
    (run.ckpt_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    report["output"] = str(config.output)
    return report


def _top_layers(policy: Any, count: int | None) -> list[int] | None:
    """Indices of the policy's top ``count`` decoder blocks (None or 0: all blocks → None)."""
    if not count:
        return None
    n_layers = int(policy.config.num_hidden_layers)
    return list(range(max(0, n_layers - int(count)), n_layers))


def prm_from_checkpoint(checkpoint: Path | str, policy: Any, *, lora_r: int | None = None) -> PersonalizedRewardModel:
    """Rebuild the PRM of a training checkpoint (e.g. to try an unfinished run)."""
    ckpt = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    if "lora_layout" in ckpt:
        prm = build_from_layout(policy, ckpt["lora_layout"])
    else:  # checkpoints written before the layout was stored
        cfg = ckpt.get("config", {})
        prm = build_prm(
            policy, lora_r=int(lora_r or cfg.get("lora_r", 8)), lora_alpha=int(cfg.get("lora_alpha", 16)),
            target_modules=cfg.get("target_modules"), layers=_top_layers(policy, cfg.get("lora_top_layers")),
        )
    _load_trainable_state(prm, ckpt["trainable"])
    for p in prm.parameters():
        p.requires_grad_(False)
    return prm.eval()
