"""What a training job asks of a Ray cluster, and whether it can ever get it: a pure check (no Ray here)
that `terarec train` and POST /v1/jobs share, so a request that can never run fails at once, in one line
that names what is missing and what to change, instead of waiting for resources forever.

>>> unfit_reason(config_with_workers_4, {"CPU": 2.0})
'workers=4 needs 1 CPU x 4 = 4 CPUs; the cluster has 2: lower workers or cpus_per_worker'
"""
from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Mapping

from .config import TrainConfig
from .errors import UserError

# what to change when a resource is short (config keys)
REMEDY = defaultdict(lambda: "lower workers", CPU="lower workers or cpus_per_worker",
                     GPU="lower workers, or set use_gpu=false")


class ResourceError(UserError):
    """The cluster cannot hold the job now or ever; the message says what is missing and what to change."""


def uses_gpu(config: TrainConfig, cluster: Mapping[str, float]) -> bool:
    """use_gpu as configured; by default, whether the cluster has GPUs."""
    return config.use_gpu if config.use_gpu is not None else cluster.get("GPU", 0) > 0


def worker_resources(config: TrainConfig, cluster: Mapping[str, float]) -> dict[str, float]:
    """One worker's request: cpus_per_worker (default: the cluster's CPUs split over the most workers, at least
    one; torch threads follow), plus one GPU when the job uses GPUs. `cluster`: ray.cluster_resources()."""
    cpus = config.cpus_per_worker or max(1, int(cluster.get("CPU", 1)) // config.max_workers)
    return {"CPU": cpus, "GPU": 1} if uses_gpu(config, cluster) else {"CPU": cpus}


def _short(config: TrainConfig, per_worker: Mapping[str, float], have: Mapping[str, float]) -> tuple[str, str, float] | None:
    """(resource, what the job's smallest size needs of it, what `have` holds) for the first resource short."""
    workers = config.min_workers
    for name, each in per_worker.items():
        need, got = each * workers, have.get(name, 0)
        if need > got:
            return name, f"workers={_said(config.workers)} needs {each:g} {name} x {workers} = {need:g} {name}s", got
    return None


def unfit_reason(config: TrainConfig, cluster: Mapping[str, float],
                 capacity: Mapping[str, float] | None = None) -> str | None:
    """Why `config` can never run, or None when it can. `cluster`: the resources the cluster has now
    (ray.cluster_resources()); `capacity`: what an autoscaling cluster may grow to, if more (the check
    then holds the job against that). An elastic job needs room for its smallest size only."""
    most = {name: max(cluster.get(name, 0), capacity.get(name, 0)) for name in {*cluster, *capacity}} \
        if capacity else cluster
    short = _short(config, worker_resources(config, cluster), most)
    if short is None:
        return None
    name, need, got = short
    return f"{need}; the cluster {'can grow to' if capacity else 'has'} {got:g}: {REMEDY[name]}"


def pending_reason(config: TrainConfig, per_worker: Mapping[str, float], free: Mapping[str, float],
                   cluster: Mapping[str, float]) -> str:
    """Why a job that could fit waits: what it needs against what is free now (ray.available_resources())."""
    short = _short(config, per_worker, free)
    if short is None:  # enough in all, but not on few enough nodes, or Ray has not caught up yet
        return f"waiting for Ray to place {config.min_workers} worker(s) of {dict(per_worker)}"
    name, need, got = short
    return f"{need}; {got:g} free of the cluster's {cluster.get(name, 0):g}"


def _said(workers: int | tuple[int, int]) -> str:
    """workers as the user writes it: 4, or [1,2]."""
    return str(workers) if isinstance(workers, int) else f"[{workers[0]},{workers[1]}]"


def unreachable_reason(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at a Ray address (host:port or ray://host:port), or None when something does.
    ray.init would retry an unreachable address for minutes; this says so in `timeout_s`. Other forms
    ('auto', 'local') are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or address in ("auto", "local"):
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        return (f"ray_address {address}: nothing answers there ({error.strerror or error}); start Ray there "
                f"(`ray start --head`), or unset ray_address and RAY_ADDRESS to run on a local Ray")
    return None
