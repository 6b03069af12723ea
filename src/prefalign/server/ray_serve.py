"""``prefalign serve --replicas N``: the same OpenAI-compatible API on Ray Serve replicas.

One Serve application, two deployments:

* ``prefalign-engine`` (N replicas, or autoscaled between bounds): each replica loads
  the model once, in ``__init__``, and runs what it is sent through its own
  :class:`~prefalign.server.scheduler.Scheduler` — continuous batching, chunked prefill
  and per-request fault isolation, as the single-process server.
* ``prefalign`` (the ingress, one replica, no CPU reserved): the app of
  :func:`~prefalign.server.app.create_app`, behind Ray Serve's HTTP proxy. It reads,
  validates and renders every request with the same code as the single-process
  server, using the tokenizer and model configuration it got from a replica (never the
  weights), so bad input is refused here and costs no replica anything. A valid request
  goes as a built :class:`~prefalign.engine.GenerationRequest` through a
  ``DeploymentHandle`` (Ray Serve's router picks the replica, its queue holds what no
  replica has room for) and the replica streams the engine's events back.

A replica that dies is restarted by Ray Serve. Its requests end with a 503 JSON error
before the first streamed byte, or an SSE error event then ``[DONE]`` after it; the
other replicas' streams go on. See docs/scaling.md.

Imported only with ``--replicas``: ``prefalign serve`` without it never imports Ray.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from ..aligner import Aligner
from ..cluster import RayCluster, ray_cluster
from ..engine import GenerationRequest, GenerationResult
from ..errors import PrefalignError
from ..methods import POLICY
from .app import _job_error, create_app, default_model_id
from .errors import APIError
from .scheduler import EngineFailure, QueueFullError, Scheduler, SchedulerStats, SchedulerStoppedError

APP = "prefalign"
ENGINE = "prefalign-engine"
INGRESS = "prefalign"
#: Seconds between Ray Serve's health checks of a replica (its default, 10, leaves a dead
#: replica unnoticed for long).
HEALTH_CHECK_PERIOD_S = 2.0
#: Replica states that count as loading in ``/health``.
LOADING_STATES = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


@dataclass(frozen=True)
class ReplicaOptions:
    """How many engine replicas, what each reserves, and autoscaling bounds.

    ``min_replicas``/``max_replicas`` (either set): Ray Serve's autoscaler keeps
    ``target_ongoing_requests`` requests per replica, starting from ``replicas``.
    """

    replicas: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise PrefalignError("--replicas must be at least 1", field="replicas")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise PrefalignError(f"--min-replicas ({low}) is above --max-replicas ({high})", field="min_replicas")
        if self.autoscaling and not (self.lowest <= self.replicas <= self.highest):
            raise PrefalignError(
                f"--replicas ({self.replicas}) must lie between --min-replicas ({self.lowest}) and --max-replicas ({self.highest})",
                field="replicas",
            )
        if self.target_ongoing_requests <= 0:
            raise PrefalignError("--target-ongoing-requests must be > 0", field="target_ongoing_requests")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def lowest(self) -> int:
        return self.min_replicas if self.min_replicas is not None else 1

    @property
    def highest(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def scaling(self) -> dict[str, Any]:
        """``serve.deployment`` options: a fixed count or Ray Serve's autoscaling config."""
        if not self.autoscaling:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.lowest, "max_replicas": self.highest,
                                       "initial_replicas": self.replicas, "target_ongoing_requests": self.target_ongoing_requests}}


@dataclass
class ReplicaSpec:
    """What the ingress needs from a replica to validate and render requests: the
    tokenizer and the model's configuration (no weights), and which models it holds."""

    tokenizer: Any
    config: Any
    generation_config: Any
    backend: str
    models: list[str]
    prm_template: str | None
    fast_path: str | None
    replica: str
    load_seconds: float
    max_rss_mb: float


# --- the engine replica -----------------------------------------------------------------


class EngineReplica:
    """One engine replica: the model, loaded once here, and a scheduler driving it.

    ``load``: the keyword arguments of :meth:`Aligner.from_pretrained` (``threads`` sets
    torch's threads; Ray reserves ``--replica-cpus`` for the replica).
    """

    def __init__(self, load: dict[str, Any], max_batch: int, max_queue: int, prefill_chunk: int | None) -> None:
        import torch

        torch.set_num_threads(load.get("threads") or 1)
        started = time.perf_counter()
        self.aligner = Aligner.from_pretrained(**load)
        self.load_seconds = time.perf_counter() - started
        if prefill_chunk is not None:
            self.aligner.engine.prefill_chunk = prefill_chunk
        self.scheduler = Scheduler(self.aligner, max_batch=max_batch, max_queue=max_queue)
        self.scheduler.start()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context is not None else "local"

    def spec(self) -> ReplicaSpec:
        model = self.aligner.model
        return ReplicaSpec(
            tokenizer=self.aligner.tokenizer,
            config=getattr(model, "config", None),
            generation_config=getattr(model, "generation_config", None),
            backend=self.aligner.backend,
            models=sorted(self.aligner.engine.models),
            prm_template=self.aligner.prm_template,
            fast_path=str(self.aligner.fast_path) if self.aligner.fast_path else None,
            replica=self.replica_id,
            load_seconds=round(self.load_seconds, 2),
            max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        )

    async def generate(self, request: GenerationRequest, stream: bool) -> Any:
        """Stream ``("accepted", replica)``, then ``("events", [Delta | GenerationResult])``
        batches up to the result, or ``("error", ...)`` (an :class:`APIError`'s fields)."""
        try:
            job = self.scheduler.submit(request, asyncio.get_running_loop(), stream=stream)
        except QueueFullError as exc:
            yield _error_message(APIError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after)}))
            return
        except SchedulerStoppedError as exc:
            yield _error_message(APIError(503, str(exc), code="server_shutting_down"))
            return
        yield ("accepted", self.replica_id)
        try:
            while True:
                # One message per batch of ready events, not one per token.
                events = await job.next_events()
                done = [e for e in events if not isinstance(e, BaseException)]
                failure = next((e for e in events if isinstance(e, BaseException)), None)
                if done:
                    yield ("events", done)
                if failure is not None:
                    yield _error_message(_job_error(failure))
                    return
                if isinstance(done[-1], GenerationResult):
                    return
        finally:
            self.scheduler.cancel(job)  # the ingress cancelled (client left): free the slot

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose scheduler thread died is restarted."""
        if not self.scheduler.is_alive():
            raise RuntimeError("the scheduler thread is not running")

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop(timeout=5)


def _error_message(error: APIError) -> tuple[Any, ...]:
    # APIError's own pickling would lose its keyword arguments: send its fields.
    return ("error", error.status, error.message, error.param, error.code, error.headers)


# --- the ingress --------------------------------------------------------------------------


class _ModelShell:
    """A replica's model as the ingress knows it: configuration, no weights."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.config = spec.config
        self.generation_config = spec.generation_config
        self.backend = spec.backend


class IngressAligner(Aligner):
    """Renders and checks requests like the replicas' aligners (same tokenizer, model
    configuration and models), without their weights."""

    def __init__(self, spec: ReplicaSpec) -> None:
        shell = _ModelShell(spec)
        super().__init__(shell, spec.tokenizer, reward_models={key: shell for key in spec.models if key != POLICY})
        self.prm_template = spec.prm_template

    def load_prm(self, path: Any = None, *, fused: bool = True) -> Any:
        if self.backend != "transformers":
            return super().load_prm(path, fused=fused)  # the single-process server's refusal
        raise PrefalignError(
            "method 'pad' on Ray Serve replicas needs its reward model loaded when they start: "
            "serve --replicas N --prm default (the embedded model's) or --prm PATH",
            field="method",
        )


class _RayJob:
    """A request sent to an engine replica: the :class:`~prefalign.server.scheduler.Job`
    interface over a Ray Serve streaming response."""

    def __init__(self, owner: RayScheduler, request: GenerationRequest, responses: Any, stream: bool) -> None:
        self.request = request
        self.stream = stream
        self.replica: str | None = None
        self.finished = False
        self.cancelled = False
        self._owner = owner
        self._responses = responses
        self._events: deque[Any] = deque()

    @property
    def id(self) -> str:
        return self.request.request_id

    async def ready(self) -> None:
        """Wait until a replica accepted the request; raise its refusal as an :class:`APIError`."""
        item = await self._receive()
        if item[0] == "accepted":
            self.replica = item[1]
            return
        error = self._error(item)
        self._finish(rejected=error.status == 429, failed=error.status != 429)
        raise error

    async def next_event(self) -> Any:
        while not self._events:
            item = await self._receive()
            if item[0] == "events":
                self._events.extend(item[1])
            else:
                self._finish(failed=True)
                return self._error(item)
        event = self._events.popleft()
        if isinstance(event, GenerationResult):
            self._finish(failed=event.error is not None, tokens=event.usage.completion_tokens)
        return event

    async def _receive(self) -> tuple[Any, ...]:
        try:
            return await self._responses.__anext__()
        except StopAsyncIteration:
            return _error_message(APIError(500, str(EngineFailure("the replica ended the request without a result")), code="engine_failure"))
        except BackPressureError:
            return _error_message(APIError(
                429, f"the server is busy: every replica is full and {self._owner.max_queue} requests are queued; retry later",
                code="rate_limit_exceeded", headers={"Retry-After": "1"},
            ))
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            # The replica died (or none is up): Ray Serve restarts it; this request is lost.
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return _error_message(APIError(
                503, f"the replica serving this request stopped ({type(exc).__name__}: {first_line[:200]}); please retry",
                code="replica_unavailable", headers={"Retry-After": "1"},
            ))
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the client gets an answer
            return _error_message(APIError(500, f"the replica failed this request ({type(exc).__name__}); please retry", code="internal_error"))

    def _error(self, item: tuple[Any, ...]) -> APIError:
        _, status, message, param, code, headers = item
        return APIError(status, message, param=param, code=code, headers=headers)

    def _finish(self, *, failed: bool = False, rejected: bool = False, tokens: int = 0) -> None:
        if self.finished:
            return
        self.finished = True
        self._owner._done(self, failed=failed, rejected=rejected, tokens=tokens)

    def cancel(self) -> None:
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        self._responses.cancel()  # Ray Serve cancels the replica's generator: its job leaves the batch
        self._owner._done(self, cancelled=True)


class RayScheduler:
    """The :class:`~prefalign.server.scheduler.Scheduler` interface of the app, over a
    handle to the engine deployment: Ray Serve's router picks a replica per request."""

    def __init__(self, handle: Any, *, app_name: str, max_batch: int, max_queue: int) -> None:
        self.handle = handle.options(stream=True)
        self.app_name = app_name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._jobs: set[_RayJob] = set()
        self._stopping = False

    def start(self) -> None:
        self._stopping = False

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for job in list(self._jobs):
            job.cancel()

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, *, stream: bool) -> _RayJob:
        if self._stopping:
            raise SchedulerStoppedError("the server is shutting down")
        job = _RayJob(self, request, self.handle.generate.remote(request, stream), stream)
        self._jobs.add(job)
        self.stats.submitted += 1
        return job

    def submit_all(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop, *, stream: bool) -> list[_RayJob]:
        """One request's answers. ``n`` > 1 is refused (400 naming ``n``): its answers share
        one prefill and one event queue in a single engine, which one replica call does
        not carry yet."""
        if len(requests) > 1:
            raise PrefalignError("n > 1 is not served with --replicas yet; send n requests (or serve without --replicas)", field="n")
        return [self.submit(requests[0], loop, stream=stream)]

    def cancel(self, job: _RayJob) -> None:
        job.cancel()

    def _done(self, job: _RayJob, *, failed: bool = False, rejected: bool = False, cancelled: bool = False, tokens: int = 0) -> None:
        self._jobs.discard(job)
        if cancelled or rejected:
            self.stats.cancelled += cancelled
            self.stats.rejected += rejected
            return
        self.stats.completed += 1
        self.stats.completion_tokens += tokens
        if failed:
            self.stats.failed += 1

    def load(self) -> dict[str, int]:
        running = sum(1 for job in self._jobs if job.replica is not None)
        return {"running": running, "waiting": len(self._jobs) - running}

    def _replica_states(self) -> dict[str, int]:
        deployment = serve.status().applications[self.app_name].deployments[ENGINE]
        return {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}

    async def health(self) -> dict[str, Any]:
        """Replicas ready and loading (from Ray Serve's controller) and this ingress's load."""
        states = await asyncio.to_thread(self._replica_states)
        ready = states.get("RUNNING", 0)
        return {
            "status": "ok" if ready else "loading",
            "replicas": {"ready": ready, "loading": sum(states.get(s, 0) for s in LOADING_STATES), "stopping": states.get("STOPPING", 0)},
            **self.load(),
            "in_flight": dict(Counter(job.replica for job in self._jobs if job.replica is not None)),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "stats": asdict(self.stats),
        }


@serve.ingress()
class Ingress:
    """The HTTP ingress: :func:`create_app` with a :class:`RayScheduler` (Ray Serve calls
    ``__serve_build_asgi_app__`` after this constructor)."""

    async def __init__(self, engine: Any, settings: dict[str, Any]) -> None:
        spec: ReplicaSpec = await engine.spec.remote()  # waits for the first replica to load
        context = serve.get_replica_context()
        self.scheduler = RayScheduler(engine, app_name=context.app_name if context else APP,
                                      max_batch=settings["max_batch"], max_queue=settings["max_queue"])
        self.api = create_app(IngressAligner(spec), scheduler=self.scheduler, **settings)

    def __serve_build_asgi_app__(self) -> Any:
        return self.api


# --- running it ---------------------------------------------------------------------------


def build_application(load: dict[str, Any], settings: dict[str, Any], options: ReplicaOptions, *,
                      prefill_chunk: int | None = None) -> Any:
    """The Serve application: ``options`` engine replicas loading ``load`` behind the ingress
    (``settings``: :func:`create_app`'s keyword arguments, ``max_batch``/``max_queue`` included)."""
    max_batch, max_queue = settings["max_batch"], settings["max_queue"]
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        # A replica takes what fits its batch; Ray Serve's router queues the rest (up to
        # max_queue, then 429) and hands it to the first replica with a free slot.
        max_ongoing_requests=max_batch,
        max_queued_requests=max_queue if max_queue > 0 else 1,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=5,
        **options.scaling(),
    )
    ingress = serve.deployment(
        Ingress,
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},  # reads bodies and renders prompts: no core of its own
        max_ongoing_requests=max(1000, 4 * options.highest * (max_batch + max_queue)),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=5,
    )
    return ingress.bind(engine.bind(load, max_batch, max_queue, prefill_chunk), settings)


@dataclass(frozen=True)
class RayServing:
    """A running deployment: its URL, the cluster and the first replica's spec."""

    url: str
    cluster: RayCluster
    spec: ReplicaSpec
    model_id: str


@contextmanager
def serve_on_ray(load: dict[str, Any], settings: dict[str, Any], options: ReplicaOptions, *, host: str = "127.0.0.1",
                 port: int = 8000, ray_address: str | None = None, prefill_chunk: int | None = None) -> Iterator[RayServing]:
    """Deploy on Ray Serve for the block: a local Ray started for it (``ray_address``
    None) is stopped after, with every process it ran; on a joined cluster only this
    application is deleted."""
    cpus = options.cpus * options.highest
    gpus = options.gpus * options.highest if options.gpus else None
    with ray_cluster(ray_address, num_cpus=max(cpus, 1.0), num_gpus=gpus, extra="cluster", field="replicas") as cluster:
        try:
            serve.start(http_options={"host": host, "port": port})
            app = build_application(load, settings, options, prefill_chunk=prefill_chunk)
            try:
                serve.run(app, name=APP, route_prefix="/")
            except RuntimeError as exc:  # a replica's constructor failed (bad model path, ...)
                raise PrefalignError(f"the engine replicas could not start: {exc}", field="model") from exc
            spec = serve.get_deployment_handle(ENGINE, app_name=APP).spec.remote().result()
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            model_id = settings.get("model_id") or default_model_id(IngressAligner(spec))
            yield RayServing(f"http://{shown}:{port}", cluster, spec, model_id)
        finally:
            if cluster.started_here:
                serve.shutdown()
            else:
                try:
                    serve.delete(APP)
                except Exception:  # noqa: BLE001 - nothing was deployed, or the cluster is gone
                    pass


def wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM (which :func:`~prefalign.cluster.ray_cluster` turns
    into a KeyboardInterrupt)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
