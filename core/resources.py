"""What a training job or a model deploy asks of a Ray cluster, and whether it can ever get it: pure checks (no
Ray here) that `terarec train`, `terarec deploy`, POST /v1/jobs and POST /v1/models share, so a request that
can never run fails at once, and one that waits says why, in one line that names what is missing and what to
change, instead of waiting for resources forever.

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


NOTICE_AFTER_S = 5.0  # workers, replicas and servers usually start within this; a longer wait is worth a line


def worker_resources(config: TrainConfig, cluster: Mapping[str, float]) -> dict[str, float]:
    """One worker's request: cpus_per_worker (default: the cluster's CPUs split over the most workers, at least
    one; torch threads follow), plus one GPU when the job uses GPUs. `cluster`: ray.cluster_resources()."""
    cpus = config.cpus_per_worker or max(1, int(cluster.get("CPU", 1)) // config.max_workers)
    return {"CPU": cpus, "GPU": 1} if uses_gpu(config, cluster) else {"CPU": cpus}


def short_of(asks: list[tuple[str, int, Mapping[str, float]]], have: Mapping[str, float]) -> tuple[str, str, float] | None:
    """(resource, what `asks` need of it, what `have` holds) for the first resource short, or None when all fit.
    `asks`: (who, how many, what one needs), e.g. ("workers=4", 4, {"CPU": 1}); needs of several asks add up."""
    for name in dict.fromkeys(name for _, _, each in asks for name in each):
        asking = [(who, count, each[name]) for who, count, each in asks if each.get(name)]
        need, got = sum(count * amount for _, count, amount in asking), have.get(name, 0)
        if need > got + 1e-9:
            parts = " + ".join(f"{who} needs {amount:g} {name} x {count}" for who, count, amount in asking)
            return name, f"{parts} = {need:g} {name}s", got
    return None


def largest(cluster: Mapping[str, float], capacity: Mapping[str, float] | None) -> Mapping[str, float]:
    """The most of each resource the cluster has now (ray.cluster_resources()) or, autoscaling, may grow to."""
    if not capacity:
        return cluster
    return {name: max(cluster.get(name, 0), capacity.get(name, 0)) for name in {*cluster, *capacity}}


def unfit_text(short: tuple[str, str, float], remedy: str, grows: bool = False) -> str:
    """short_of's answer against the whole cluster, as one line: what is needed, what there is, what to change."""
    name, need, got = short
    return f"{need}; the cluster {'can grow to' if grows else 'has'} {round(got, 3):g}: {remedy}"


def pending_text(short: tuple[str, str, float] | None, cluster: Mapping[str, float], placing: str) -> str:
    """short_of's answer against the free resources, as one line; `placing` when nothing is short (Ray is
    still placing them, or they need fewer nodes than the free resources lie on)."""
    if short is None:
        return f"waiting for Ray to place {placing}"
    name, need, got = short
    return f"{need}; {round(got, 3):g} free of the cluster's {cluster.get(name, 0):g}"


def _job_asks(config: TrainConfig, per_worker: Mapping[str, float]) -> list[tuple[str, int, Mapping[str, float]]]:
    """A job's smallest size: what short_of weighs."""
    return [(f"workers={_said(config.workers)}", config.min_workers, per_worker)]


def unfit_reason(config: TrainConfig, cluster: Mapping[str, float],
                 capacity: Mapping[str, float] | None = None) -> str | None:
    """Why `config` can never run, or None when it can. `cluster`: the resources the cluster has now
    (ray.cluster_resources()); `capacity`: what an autoscaling cluster may grow to, if more (the check
    then holds the job against that). An elastic job needs room for its smallest size only."""
    short = short_of(_job_asks(config, worker_resources(config, cluster)), largest(cluster, capacity))
    if short is None:
        return None
    return unfit_text(short, REMEDY[short[0]], grows=bool(capacity))


def pending_reason(config: TrainConfig, per_worker: Mapping[str, float], free: Mapping[str, float],
                   cluster: Mapping[str, float]) -> str:
    """Why a job that could fit waits: what it needs against what is free now (ray.available_resources())."""
    placing = f"{config.min_workers} worker(s) of {dict(per_worker)}"
    return pending_text(short_of(_job_asks(config, per_worker), free), cluster, placing)


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
