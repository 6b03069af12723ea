"""The evaluation's Ray executor: batches shipped to Ray actors, rows written here.

Each actor (:class:`_RayWorker`) loads the model once and runs a
:class:`~prefalign.eval.execute.BatchExecutor`; :func:`_run_ray` starts (or joins)
the Ray cluster (:func:`prefalign.cluster.ray_cluster`, shared with ``serve
--replicas``), keeps every actor busy with the planned batches and hands each
finished batch's rows to the runner's writer.
"""

from __future__ import annotations

import os
import platform
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import PrefalignError
from .execute import BatchExecutor, _load_aligner, _model_name
from .plan import Batch, EvalConfig


class _RayWorker:
    """A Ray actor: loads the model once, then decodes whole batches into rows."""

    def __init__(self, config: EvalConfig) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS=1 for actors without GPUs; follow --threads or the
        # CPUs reserved for the actor, so actors on one node do not oversubscribe it.
        torch.set_num_threads(config.threads or 1)
        self.aligner = _load_aligner(config.model, fast=config.fast, prm=config.prm, threads=config.threads,
                                     backend=config.model_backend)
        self.executor = BatchExecutor(self.aligner, max_new_tokens=config.max_new_tokens, template=config.template,
                                      judge_backend=config.judge_backend)

    def describe(self) -> dict[str, Any]:
        return {"model": _model_name(self.aligner), "fast_path": str(self.aligner.fast_path), "node": platform.node()}

    def run_batch(self, batch: Batch) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        self.executor.run(batch, lambda _gen, new: rows.extend(new))
        return rows


def _run_ray(config: EvalConfig, batches: Sequence[Batch], writer: Any, record: dict[str, Any],
             persist: Callable[[], None]) -> None:
    """Shard batches over Ray actors; rows come back per batch and go to ``writer.write``
    (the runner's results writer)."""
    from ..cluster import ray_cluster

    threads = config.threads or 1
    local_cpus = (config.ray_workers or max(1, (os.cpu_count() or 2) // 2)) * threads
    with ray_cluster(config.ray_address, num_cpus=local_cpus) as cluster:
        import ray

        cpus = float(cluster.resources().get("CPU", 1))
        n_workers = config.ray_workers or max(1, int(cpus // threads))
        n_workers = min(n_workers, len(batches))
        actor_cls = ray.remote(num_cpus=threads)(_RayWorker)
        actors = [
            actor_cls.remote(config)
            for _ in range(n_workers)
        ]
        try:
            info = ray.get([a.describe.remote() for a in actors])
        except Exception as exc:  # an actor's __init__ failed (bad model path, missing PRM, ...)
            cause = getattr(exc, "cause", None) or exc
            raise PrefalignError(f"Ray workers could not start: {cause}", field="model") from exc
        record["ray"] = {"address": cluster.name, "workers": n_workers, "cluster_cpus": cpus,
                         "workers_info": info}
        record["model"] = record["ray"]["workers_info"][0]["model"]
        persist()
        queue = deque(batches)
        pending: dict[Any, Any] = {}

        def submit(actor: Any) -> None:
            if queue:
                pending[actor.run_batch.remote(queue.popleft())] = actor

        for actor in actors:
            submit(actor)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(ready[0])
                writer.write(ray.get(ready[0]))
                submit(actor)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            for actor in actors:
                ray.kill(actor)
