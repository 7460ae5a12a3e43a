"""What a training job asks of a Ray cluster, and whether it can ever get it: a pure check (no Ray here)
that `terarec train` and POST /v1/jobs share, so a request that can never run fails at once, in one line
that names what is missing and what to change, instead of waiting for resources forever.

>>> unfit_reason(config_with_workers_4, {"CPU": 2.0})
'workers=4 needs 1 CPU x 4 = 4 CPUs; the cluster has 2: lower workers or cpus_per_worker'
"""
from __future__ import annotations

from collections.abc import Mapping

from .config import TrainConfig
from .errors import UserError

# what to change when a resource is short (config keys)
REMEDY = {"CPU": "lower workers or cpus_per_worker", "GPU": "lower workers, or set use_gpu=false"}


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


def shortfall(config: TrainConfig, per_worker: Mapping[str, float], have: Mapping[str, float],
              where: str = "the cluster has") -> str | None:
    """The first resource of which `have` holds less than the job's smallest size needs, said as one line."""
    workers = config.min_workers
    for name, each in per_worker.items():
        need, got = each * workers, have.get(name, 0)
        if need > got:
            return (f"workers={_said(config.workers)} needs {each:g} {name} x {workers} = {need:g} {name}s; {where} {got:g}: "
                    f"{REMEDY.get(name, 'lower workers')}")
    return None


def unfit_reason(config: TrainConfig, cluster: Mapping[str, float],
                 capacity: Mapping[str, float] | None = None) -> str | None:
    """Why `config` can never run, or None when it can. `cluster`: the resources the cluster has now
    (ray.cluster_resources()); `capacity`: what an autoscaling cluster may grow to, if more (the check
    then holds the job against that). An elastic job needs room for its smallest size only."""
    capacity = {name: max(cluster.get(name, 0), capacity.get(name, 0)) for name in {*cluster, *capacity}} \
        if capacity else cluster
    where = "the cluster can grow to" if capacity is not cluster else "the cluster has"
    return shortfall(config, worker_resources(config, cluster), capacity, where)


def _said(workers: int | tuple[int, int]) -> str:
    """workers as the user writes it: 4, or [1,2]."""
    return str(workers) if isinstance(workers, int) else f"[{workers[0]},{workers[1]}]"
