"""The evaluation's execution: decode a planned batch and judge each answer into rows.

:class:`BatchExecutor` turns a :class:`~prefalign.eval.plan.Batch` into engine
requests (one per generation), runs them in one engine session, and makes the
:class:`ResultRow` of each cell: the answer, its usage, the preference's judge
scores and the collapse guards. Used in this process by the local executor and inside
each Ray actor (:mod:`prefalign.eval.ray_executor`). Which rows to run is the plan's
business (:mod:`prefalign.eval.plan`); where rows go, the runner's
(:mod:`prefalign.eval.runner`).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable
from typing import Any, TypedDict

from ..prompts import parse_preferences
from ..spec import RequestSpec
from .plan import Batch, Generation, MethodVariant


class ResultRow(TypedDict, total=False):
    """One line of ``results.jsonl``: a prompt × preference × method variant.

    The keys are those every run has written (so old directories resume: their rows'
    :func:`~prefalign.eval.results.key_of` is unchanged); ``judges`` and
    ``judge_error`` appear only when there are several judges, or one failed.
    """

    dataset: str
    prompt_id: str
    prompt: str
    preference: str
    preference_text: str | list[str]
    method: str
    variant: str
    sweep: dict[str, Any]
    params: dict[str, Any]
    template: str
    text: str
    completion_tokens: int
    finish_reason: str
    seconds: float
    forward_passes: int
    judge: str
    direction: int
    score: float | None
    judge_scores: dict[str, float]
    guards: dict[str, Any]
    generation: str
    shared: bool
    batch: dict[str, Any]
    time: str
    judges: list[dict[str, Any]]
    judge_error: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _answer_template(request: Any, template: str) -> str:
    """The template of the context whose prompt ``request``'s answer continues."""
    role = request.method.roles(len(request.weights))[request.primary]
    return role.template or template


class BatchExecutor:
    """Decodes batches with one :class:`~prefalign.Aligner` and turns answers into rows.

    Used in-process by the local executor and inside each Ray actor.
    """

    def __init__(self, aligner: Any, *, max_new_tokens: int, template: str | None, judge_backend: str = "auto") -> None:
        self.aligner = aligner
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.judge_backend = judge_backend
        self._judges: dict[str, list[Any]] = {}

    def judges(self, preference: str) -> list[Any]:
        """The judge(s) of a preference (several for a combined PAD principle), cached."""
        if preference not in self._judges:
            from .judges import judges_for

            self._judges[preference] = judges_for(preference, backend=self.judge_backend)  # type: ignore[arg-type]
        return self._judges[preference]

    def _template_for(self, variant: MethodVariant) -> str:
        return self.template or self.aligner.template_for(variant.method)

    def run(self, batch: Batch, emit: Callable[[Generation, list[ResultRow]], None]) -> None:
        """Decode ``batch``; call ``emit(generation, rows)`` as each generation finishes."""
        al = self.aligner
        template = self._template_for(batch.variant)
        specs: dict[Any, RequestSpec] = {}  # one checked spec per preference of the batch
        requests = []
        for gen in batch.generations:
            if gen.preference not in specs:
                pref = None if gen.preference is None else parse_preferences(gen.preference)
                specs[gen.preference] = RequestSpec.build(
                    batch.variant.method, pref, max_new_tokens=self.max_new_tokens, template=template,
                    **dict(batch.variant.overrides),
                )
            requests.append(al.prepare(specs[gen.preference], gen.prompt))
        by_id = {r.request_id: (g, r) for g, r in zip(batch.generations, requests)}
        started = time.perf_counter()
        # Interrupted (Ctrl-C, an error in emit): the session cancels what is unfinished.
        with al.engine.session(requests) as session:
            for event in session:
                if event.result is None:
                    continue
                gen, request = by_id[event.request_id]
                elapsed = time.perf_counter() - started
                emit(gen, self.rows(batch, gen, event.result, template, elapsed, answer_template=_answer_template(request, template)))

    def rows(
        self, batch: Batch, gen: Generation, result: Any, template: str, elapsed: float, *, answer_template: str | None = None,
    ) -> list[ResultRow]:
        """The results rows of one finished generation.

        ``answer_template``: the template of the context the answer continues, when the
        method renders that one differently from the request (PAD's ``candidate_template``).
        """
        from .guards import guard_report, perplexity

        al = self.aligner
        # Perplexity of the answer under the model, given the *base* context (no
        # preference) of the template the answer continues: how natural the answer is
        # as a reply to the prompt, whichever method produced it.
        base_ids = al.encode_context(gen.prompt, None, template=answer_template or template)
        ppl = perplexity(al.model, al.tokenizer, [(base_ids, result.token_ids)])[0] if result.token_ids else None
        guards = guard_report(result.text, finish_reason=result.finish_reason, perplexity=ppl).as_dict()
        # The verdict here lacks the perplexity-ratio rule (it needs the base answer of
        # the same prompt); the report recomputes it with that reference.
        guards.pop("perplexity_ratio", None)
        rows: list[ResultRow] = []
        for cell in gen.cells:
            judges = self.judges(cell.preference)
            primary = judges[0]
            scores: dict[str, float] = {}
            error = None
            try:
                for j in judges:
                    scores.update(j.details(result.text, prompt=cell.prompt))
                score: float | None = scores[primary.name]
            except Exception as exc:  # a judge failing on one odd text must not stop the grid
                score, error = None, f"{type(exc).__name__}: {exc}"
            prefs = parse_preferences(cell.preference)
            row: ResultRow = {
                "dataset": cell.dataset,
                "prompt_id": cell.prompt_id,
                "prompt": cell.prompt,
                "preference": cell.preference,
                "preference_text": prefs[0].text if len(prefs) == 1 else [p.text for p in prefs],
                "method": cell.variant.method,
                "variant": cell.variant.label,
                "sweep": dict(cell.variant.overrides),
                "params": cell.variant.params,
                "template": template,
                "text": result.text,
                "completion_tokens": result.usage.completion_tokens,
                "finish_reason": result.finish_reason,
                "seconds": result.seconds,
                "forward_passes": result.usage.forward_passes,
                "judge": primary.name if len(judges) == 1 else "+".join(j.name for j in judges),
                "direction": primary.direction,
                "score": score,
                "judge_scores": scores,
                "guards": guards,
                "generation": gen.id,
                "shared": len(gen.cells) > 1,
                "batch": {"id": batch.id, "plan": batch.plan_id, "size": len(batch.generations), "elapsed": elapsed},
                "time": _now(),
            }
            if len(judges) > 1:
                row["judges"] = [{"name": j.name, "direction": j.direction, "score": scores.get(j.name)} for j in judges]
            if error:
                row["judge_error"] = error
            rows.append(_clean(row))
        return rows


def _model_name(aligner: Any) -> str:
    return str(getattr(aligner.model.config, "name_or_path", "") or type(aligner.model).__name__)


def _load_aligner(model: str | None, *, fast: bool | str, prm: str | None, threads: int | None, backend: str = "transformers") -> Any:
    from ..aligner import Aligner

    if backend != "transformers":
        return Aligner.from_pretrained(model, prm=prm, threads=threads, backend=backend)
    return Aligner.from_pretrained(model, fast=fast, prm=prm, threads=threads)
