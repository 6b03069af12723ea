"""Command-line entry points for PRMs: ``prefalign make-pairs`` and ``prefalign train-prm``.

These are plain typer-annotated functions; ``prefalign.cli`` registers them::

    from prefalign.prm.cli import make_pairs, train_prm
    app.command("make-pairs")(make_pairs)
    app.command("train-prm")(train_prm)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import PrefalignError


def _parse_prefs(text: str) -> list[str]:
    prefs = [p.strip() for p in text.split(",") if p.strip()]
    if not prefs:
        raise typer.BadParameter("give at least one preference, e.g. concise,verbose")
    return prefs


def make_pairs(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to append pairs to")] = Path("prm-pairs.jsonl"),
    model: Annotated[str, typer.Option(help="policy model: 'embedded', a directory, a .gguf or a hub id")] = "embedded",
    preferences: Annotated[str, typer.Option(help="comma-separated preset names (or sentences)")] = "concise,verbose,elementary,expert,pleasant,formal",
    num_prompts: Annotated[int, typer.Option(help="training prompts to use (0 = all)")] = 100,
    data_dir: Annotated[Path | None, typer.Option(help="the shared data directory (default ../shared/data)")] = None,
    base_samples: Annotated[int, typer.Option(help="answers sampled without a preference per prompt")] = 2,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 0.8,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per sampled answer")] = 96,
    prompts_per_batch: Annotated[int, typer.Option(help="prompts decoded together (each gives prefs+base rows)")] = 4,
    margin_scale: Annotated[float, typer.Option(help="multiply every judge's minimum margin")] = 1.0,
    max_prompt_chars: Annotated[int, typer.Option(help="skip longer prompts")] = 400,
    seed: Annotated[int, typer.Option(help="shuffling and sampling seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--overwrite", help="continue an interrupted run or start afresh")] = True,
    time_budget: Annotated[float, typer.Option(help="stop after this many minutes (0 = no limit)")] = 0.0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 1,
    skip: Annotated[int, typer.Option(help="skip the first N shuffled training prompts (e.g. those an earlier run used)")] = 0,
    chosen_max_repetition: Annotated[float, typer.Option(help="a chosen answer may repeat at most this share of its word 4-grams (1 = no limit)")] = 0.1,
    on_policy: Annotated[str | None, typer.Option(help="also decode each preference greedily with this method (e.g. pad); its collapsed answers become rejected answers")] = None,
    prm: Annotated[Path | None, typer.Option(help="PRM for --on-policy pad (default: the shipped one for the embedded model)")] = None,
    on_policy_param: Annotated[list[str] | None, typer.Option("--on-policy-param", help="parameter key=value of the --on-policy method, e.g. candidate_template=default (repeatable)")] = None,
    on_policy_pairs: Annotated[bool, typer.Option(help="a clean on-policy answer that the judge's best answer beats by the margin becomes a rejected answer too")] = False,
    greedy_pref: Annotated[bool, typer.Option(help="also decode each preference greedily with pref (default template) into the pool")] = False,
    template: Annotated[str, typer.Option(help="template the answers are sampled under: pad (PAD's guideline prompt) or default; match train-prm --template")] = "pad",
) -> None:
    """Sample answers from the policy, judge them per preference and write best-vs-worst pairs.

    Uses only training prompts (rows ≥ 100 of HelpSteer_train and UltraFeedback_ultrachat);
    see docs/prm.md for the split and what the proxy judges measure.
    """
    import torch
    from tqdm import tqdm

    from ..aligner import Aligner
    from ..cli import _parse_params
    from ..methods import make_method
    from ..prompts import TEMPLATES
    from .pairs import synthesize_pairs, training_prompts

    torch.set_num_threads(threads)
    prefs = _parse_prefs(preferences)
    try:
        policy_params = _parse_params(on_policy_param or [])
        if on_policy:
            make_method(on_policy, **policy_params)  # a bad name or value fails before the model loads
        elif policy_params or on_policy_pairs:
            raise PrefalignError("--on-policy-param and --on-policy-pairs need --on-policy METHOD (e.g. --on-policy pad)", field="on_policy")
        if template not in TEMPLATES:
            raise PrefalignError(f"unknown --template {template!r}; choose one of {', '.join(TEMPLATES)}", field="template")
        prompts = training_prompts(data_dir, limit=(num_prompts + skip) if num_prompts else None, seed=seed, max_chars=max_prompt_chars)[skip:]
        aligner = Aligner.from_pretrained(model, prm=prm)
        bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr)
        done_before = output.with_name(output.name + ".done")
        if resume and done_before.is_file():
            bar.update(len({line for line in done_before.read_text().splitlines() if line.strip()} & {p.prompt_id for p in prompts}))
        try:
            stats = synthesize_pairs(
                aligner, prompts, output, preferences=prefs, base_samples=base_samples, temperature=temperature,
                max_new_tokens=max_new_tokens, prompts_per_batch=prompts_per_batch, seed=seed,
                margin_scale=margin_scale, resume=resume, progress=bar.update, on_policy=on_policy,
                on_policy_params=policy_params, on_policy_pairs=on_policy_pairs, greedy_pref=greedy_pref, template=template,
                chosen_max_repetition=chosen_max_repetition if chosen_max_repetition < 1 else None,
                time_budget_s=time_budget * 60 if time_budget else None,
            )
        except KeyboardInterrupt:
            bar.close()
            typer.echo(f"interrupted; rows so far are in {output} — run again to resume", err=True)
            raise typer.Exit(130) from None
        bar.close()
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"output": str(output), **stats.__dict__}, indent=1))


def train_prm(
    data: Annotated[Path, typer.Argument(help="pairs: a JSONL file or a `datasets` dataset saved on disk")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory of the trained PRM")] = Path("prm"),
    model: Annotated[str, typer.Option(help="policy model: 'embedded', a directory, a .gguf or a hub id")] = "embedded",
    beta: Annotated[float, typer.Option(help="DPO beta")] = 0.1,
    lr: Annotated[float, typer.Option(help="learning rate (AdamW)")] = 5e-4,
    linear_lr_scale: Annotated[float, typer.Option(help="the Linear(d, d) layer's learning rate is lr × this")] = 0.1,
    epochs: Annotated[float, typer.Option(help="passes over the training pairs (fractions allowed)")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="pairs per optimiser step")] = 4,
    group_by_prompt: Annotated[bool, typer.Option("--group-by-prompt/--no-group-by-prompt", help="keep all pairs of a prompt in one step (mirrored pairs cancel out what does not depend on the preference)")] = True,
    micro_batch: Annotated[int, typer.Option(help="pairs per forward pass")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha")] = 16,
    lora_top_layers: Annotated[int, typer.Option(help="adapt only the top N decoder blocks (0 = all; faster training)")] = 0,
    held_out: Annotated[float, typer.Option(help="share of prompts held out for evaluation")] = 0.1,
    max_prompt_tokens: Annotated[int, typer.Option(help="drop pairs with longer prompts")] = 160,
    max_answer_tokens: Annotated[int, typer.Option(help="truncate answers to this many tokens")] = 96,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bfloat16 autocast on CPU (faster where supported)")] = True,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="checkpoints (default OUTPUT/../OUTPUT-checkpoints)")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="optimiser steps between checkpoints")] = 10,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = False,
    time_budget: Annotated[float, typer.Option(help="stop training after this many minutes (the reference pass included), then evaluate and save (0 = none)")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 1,
    init: Annotated[Path | None, typer.Option(help="start from this trained PRM (a further round on new pairs; its LoRA layout wins)")] = None,
    template: Annotated[str, typer.Option(help="prompt template the PRM reads the preference through: pad (the paper's guideline prompt) or default")] = "pad",
) -> None:
    """Train a personalised reward model with DPO on preference pairs (see docs/prm.md)."""
    import torch

    from .train import TrainConfig, train

    torch.set_num_threads(threads)
    config = TrainConfig(
        data=data, output=output, model=model, beta=beta, lr=lr, linear_lr_scale=linear_lr_scale, epochs=epochs, batch_size=batch_size, group_by_prompt=group_by_prompt,
        micro_batch=micro_batch, lora_r=lora_r, lora_alpha=lora_alpha, lora_top_layers=lora_top_layers or None, held_out=held_out,
        max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens, bf16=bf16,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
        time_budget_s=time_budget * 60 if time_budget else None, seed=seed, init_from=init, template=template,
        command=" ".join(["prefalign", "train-prm", *sys.argv[2:]]) if len(sys.argv) > 1 else None,
    )
    try:
        report = train(config)
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=1, default=str))
    if report.get("status") == "interrupted":
        raise typer.Exit(130)
