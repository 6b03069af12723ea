"""``prefalign serve``: load a model and serve the OpenAI-compatible API with uvicorn.

Registered in the main CLI as ``app.command("serve")(serve)``.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Optional

import typer

from ..cluster import RAY_ADDRESS_HELP

RAY = "Ray Serve replicas (prefalign[cluster]; docs/scaling.md)"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[
        Optional[str], typer.Option(help="Model: a transformers directory, a .gguf file or a hub id (default: the embedded SmolLM2-135M).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="PREFALIGN_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (prefer the env var: argv is visible to other users)."),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together (continuous batching).")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting for a batch slot before 429.")] = 64,
    max_tokens_cap: Annotated[int, typer.Option(min=1, help="Largest max_tokens accepted (also the chat default).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body; larger ones get 413.")] = 1_000_000,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Largest prompt, in tokens over all contexts of a request's method; larger ones get 400.")] = 8192,
    prefill_chunk: Annotated[int, typer.Option(min=1, help="Prompt tokens prefilled per step between the decode steps of running streams (benchmarks/long_prompt.py).")] = 32,
    default_method: Annotated[str, typer.Option(help="Method for requests that give a preference but no alignment.method (no preference: base).")] = "pref",
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id reported by /v1/models (default: the model's name).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights' dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch intra-op threads (1: measured no slower than 2 on a small CPU, and robust when it is shared).")] = 1,
    fast: Annotated[bool, typer.Option("--fast/--no-fast", help="CPU fast path (prepacked oneDNN linear layers) where available.")] = True,
    backend: Annotated[str, typer.Option(help="transformers (PyTorch) or llamacpp (a GGUF in llama.cpp; prefalign[llamacpp]; no pad).")] = "transformers",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    prm: Annotated[
        Optional[str],
        typer.Option(help="Load a personalised reward model for method 'pad' at start-up ('default': the one shipped for the embedded model); otherwise it loads on the first PAD request."),
    ] = None,
    head_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a connection has to send a whole request head (silent and slow-header connections are closed).")] = 10.0,
    keep_alive_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds an idle kept-alive connection stays open between requests.")] = 5.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request body has to arrive (408).")] = 30.0,
    idle_stream_timeout: Annotated[float, typer.Option(min=0, help="Cancel a stream whose client has not read it for this many seconds, freeing its batch slot (0: never).")] = 60.0,
    max_connections: Annotated[int, typer.Option(min=0, help="Open connections in all; more are answered 503 and closed (0: no cap).")] = 512,
    max_connections_per_ip: Annotated[int, typer.Option(min=0, help="Open connections from one client address (0: no cap; behind a reverse proxy every client has its address).")] = 128,
    replicas: Annotated[Optional[int], typer.Option(min=1, help="Serve from N engine replicas on Ray Serve (without it: this process, no Ray).", rich_help_panel=RAY)] = None,
    ray_address: Annotated[Optional[str], typer.Option(help=RAY_ADDRESS_HELP, rich_help_panel=RAY)] = None,
    replica_cpus: Annotated[float, typer.Option(min=0, help="CPUs Ray reserves per replica (torch uses --threads).", rich_help_panel=RAY)] = 1.0,
    replica_gpus: Annotated[float, typer.Option(min=0, help="GPUs per replica (1 with --device cuda: one replica per GPU).", rich_help_panel=RAY)] = 0.0,
    min_replicas: Annotated[Optional[int], typer.Option(min=1, help="Autoscale: fewest replicas.", rich_help_panel=RAY)] = None,
    max_replicas: Annotated[Optional[int], typer.Option(min=1, help="Autoscale: most replicas.", rich_help_panel=RAY)] = None,
    target_ongoing_requests: Annotated[float, typer.Option(min=0.1, help="Autoscale: requests per replica Ray Serve aims at.", rich_help_panel=RAY)] = 8.0,
) -> None:
    """Serve an OpenAI-compatible chat API with per-request preferences."""
    import uvicorn

    from ..aligner import Aligner
    from ..errors import PrefalignError
    from .app import create_app
    from .transport import ConnectionLimits, uvicorn_settings

    if not _is_loopback(host) and not api_key:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    if backend == "llamacpp":
        load = dict(model=model, backend=backend, threads=threads, prm=prm)
    else:
        load = dict(model=model, device=device, dtype=dtype, threads=threads, fast="auto" if fast else False, prm=prm, backend=backend)
    if replicas is None and (ray_address or min_replicas or max_replicas):
        typer.echo("error: --ray-address, --min-replicas and --max-replicas need --replicas N", err=True)
        raise typer.Exit(2)
    if replicas is not None:
        settings = dict(api_key=api_key, max_batch=max_batch, max_queue=max_queue, max_tokens_cap=max_tokens_cap, max_body_bytes=max_body_bytes,
                        model_id=served_model_name, default_method=default_method, max_prompt_tokens=max_prompt_tokens,
                        body_timeout=body_timeout, idle_stream_timeout=idle_stream_timeout or None)
        scaling = dict(replicas=replicas, cpus=replica_cpus, gpus=replica_gpus, min_replicas=min_replicas, max_replicas=max_replicas,
                       target_ongoing_requests=target_ongoing_requests)
        _serve_replicas(load, settings, scaling, host=host, port=port, ray_address=ray_address, prefill_chunk=prefill_chunk)
        return
    try:
        aligner = Aligner.from_pretrained(**load)
        app = create_app(
            aligner,
            api_key=api_key,
            max_batch=max_batch,
            max_queue=max_queue,
            max_tokens_cap=max_tokens_cap,
            max_body_bytes=max_body_bytes,
            model_id=served_model_name,
            default_method=default_method,
            max_prompt_tokens=max_prompt_tokens,
            prefill_chunk=prefill_chunk,
            body_timeout=body_timeout,
            idle_stream_timeout=idle_stream_timeout or None,
        )
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"serving {app.state.config.model_id} on http://{host}:{port}/v1 (max batch {max_batch}, queue {max_queue})", err=True)
    # A short graceful-shutdown timeout: open streams are cut instead of holding Ctrl-C.
    limits = ConnectionLimits(
        head_timeout=head_timeout,
        keep_alive_timeout=keep_alive_timeout,
        max_connections=max_connections,
        max_connections_per_ip=max_connections_per_ip,
    )
    run_server(app, uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **uvicorn_settings(limits)))


def run_server(app: Any, config: Any) -> None:
    """Run ``app`` under uvicorn; Ctrl-C (SIGINT, SIGTERM) stops its scheduler first, so
    running requests end at once with a ``server_shutting_down`` error (streams get it
    as their last event) and the process exits without waiting for them (status 130
    after Ctrl-C: uvicorn re-raises the signal once it has shut down)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.scheduler.request_stop()
            super().handle_exit(sig, frame)

    Server(config).run()


def _serve_replicas(load: dict, settings: dict, scaling: dict, **where: Any) -> None:
    """``serve --replicas N``: the same app on Ray Serve replicas until Ctrl-C or SIGTERM."""
    from ..errors import PrefalignError

    try:
        from .ray_serve import ReplicaOptions, serve_on_ray, wait_for_signal
    except ImportError as exc:
        typer.echo(f"error: --replicas needs Ray Serve ({exc}): pip install 'prefalign[cluster]'", err=True)
        raise typer.Exit(2) from exc
    try:
        options = ReplicaOptions(**scaling)
        with serve_on_ray(load, settings, options, **where) as live:
            scale = f"{options.lowest}-{options.highest} (autoscaled)" if options.autoscaling else str(options.replicas)
            typer.echo(f"serving {live.model_id} on {live.url}/v1 from {scale} replicas on Ray ({live.cluster.name}); "
                       f"each loaded in {live.spec.load_seconds:.1f} s, {live.spec.max_rss_mb:.0f} MB", err=True)
            wait_for_signal()
    except PrefalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
