"""One way to start or join Ray, shared by ``eval --executor ray`` and ``serve --replicas``.

``--ray-address`` means the same on both commands:

* not given: Ray starts on this machine for the command (``ray.init`` with the CPUs the
  command asks for) and stops with it;
* ``auto``: the cluster already running on this machine (``ray start --head``);
* ``HOST:PORT``: the head node's GCS address of a running cluster;
* ``ray://HOST:10001``: a cluster through the Ray client.

A cluster that the command joined is left running when it ends; only what the command
created on it is removed. Ray is imported here, never at prefalign's import time.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import PrefalignError

#: What ``--ray-address`` says on every command that takes it.
RAY_ADDRESS_HELP = "Ray cluster to join: 'auto' (ray start on this machine), HOST:PORT or ray://HOST:10001 (default: start Ray locally for this command and stop it after)."


def import_ray(extra: str = "ray", field: str = "executor") -> Any:
    """``import ray``, or a :class:`PrefalignError` naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise PrefalignError(f"this needs Ray, which is not installed: pip install 'prefalign[{extra}]'", field=field) from exc
    return ray


@dataclass(frozen=True)
class RayCluster:
    """The Ray a command runs on: ``address`` as given (None: local) and whether this
    command started it (a local Ray, stopped with the command)."""

    address: str | None
    started_here: bool

    @property
    def name(self) -> str:
        """How results and logs name the cluster: the address, or ``local``."""
        return self.address or "local"

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (``CPU``, ``GPU``, ...)."""
        import ray

        return dict(ray.cluster_resources())


@contextmanager
def ray_cluster(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
                extra: str = "ray", field: str = "executor") -> Iterator[RayCluster]:
    """Join ``address`` or start a local Ray (``num_cpus``/``num_gpus`` logical resources)
    for the duration of the block; a Ray this started is shut down on the way out, with
    every process it ran. Inside an already initialised Ray (a test, a notebook), that one
    is used and left alone."""
    ray = import_ray(extra, field)
    if ray.is_initialized():
        yield RayCluster(address, started_here=False)
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise PrefalignError(f"cannot reach the Ray cluster at {address!r}: {exc}", field="ray_address") from exc
    # Ray's driver aborts on SIGTERM (its own handler), leaving the local Ray's processes
    # behind: make SIGTERM a KeyboardInterrupt, so the command stops as on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        yield RayCluster(address, started_here=not address)
    finally:
        ray.shutdown()  # a joined cluster: only disconnects
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
