"""The evaluation's command echo: the ``prefalign eval`` line that reproduces a run.

Recorded in ``config.json`` (``runs[].command``) and shown by the report, so that a
results directory says how to make it again. Reads an
:class:`~prefalign.eval.plan.EvalConfig` by its fields only (no import of the plan).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any


def eval_command(config: Any, out: str | Path | None = None) -> str:
    """The ``prefalign eval`` command line that reproduces ``config`` (an ``EvalConfig``), into ``out``."""
    args = ["prefalign", "eval"]
    for d in config.datasets:
        args += ["--dataset", str(d)]
    if all(" " not in p and "," not in p for p in config.preferences):
        args += ["--preferences", ",".join(config.preferences)]
    else:  # free text: one option per preference
        for p in config.preferences:
            args += ["--preferences", p]
    args += ["--methods", ",".join(config.methods)]
    for s in config.sweeps:
        args += ["--sweep", s]
    if config.limit is not None:
        args += ["--limit", str(config.limit)]
    args += ["--max-new-tokens", str(config.max_new_tokens), "--seed", str(config.seed)]
    for flag, value in (
        ("--field", config.prompt_field), ("--template", config.template), ("--model", config.model), ("--prm", config.prm),
        ("--threads", config.threads), ("--ray-address", config.ray_address), ("--ray-workers", config.ray_workers),
    ):
        if value is not None:
            args += [flag, str(value)]
    if config.batch_size != 8:
        args += ["--batch-size", str(config.batch_size)]
    if config.executor != "local":
        args += ["--executor", config.executor]
    if config.model_backend != "transformers":
        args += ["--backend", config.model_backend]
    if config.judge_backend != "auto":
        args += ["--judge-backend", config.judge_backend]
    if out is not None:
        args += ["--out", str(out)]
    return shlex.join(args)
