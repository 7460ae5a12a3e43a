"""Whether a job can ever fit a cluster: the pure check `terarec train` and POST /v1/jobs run before submitting."""
from __future__ import annotations

import pytest

from terarec.core.config import load_config
from terarec.core.resources import pending_text, short_of, unfit_reason, worker_resources


def job(**settings):
    return load_config(overrides=[f"{key}={value}" for key, value in settings.items()], flags={"data": "d"})


def test_more_workers_than_cpus_names_the_count_and_the_remedy():
    assert unfit_reason(job(workers=4), {"CPU": 2.0}) == \
        "workers=4 needs 1 CPU x 4 = 4 CPUs; the cluster has 2: lower workers or cpus_per_worker"
    assert unfit_reason(job(workers=2, cpus_per_worker=1.5), {"CPU": 2.0}) == \
        "workers=2 needs 1.5 CPU x 2 = 3 CPUs; the cluster has 2: lower workers or cpus_per_worker"


def test_gpus_per_worker_against_the_cluster():
    reason = unfit_reason(job(workers=2, batch_size=4096), {"CPU": 16.0, "GPU": 1.0})
    assert reason == "workers=2 needs 1 GPU x 2 = 2 GPUs; the cluster has 1: lower workers, or set use_gpu=false"
    assert unfit_reason(job(use_gpu="true"), {"CPU": 8.0}).startswith("workers=1 needs 1 GPU x 1 = 1 GPUs; the cluster has 0")
    assert unfit_reason(job(workers=2, use_gpu="false"), {"CPU": 16.0, "GPU": 1.0}) is None


@pytest.mark.parametrize("workers, cluster", [(1, {"CPU": 1.0}), (4, {"CPU": 4.0}), ("[2,8]", {"CPU": 2.0}),
                                              (2, {"CPU": 4.0, "GPU": 2.0})])
def test_requests_that_fit_pass(workers, cluster):
    assert unfit_reason(job(workers=workers, batch_size=3360), cluster) is None


def test_an_elastic_job_needs_room_for_its_smallest_size_only():
    assert unfit_reason(job(workers="[2,4]", batch_size=4092), {"CPU": 1.0}).startswith("workers=[2,4] needs 1 CPU x 2 = 2 CPUs")


def test_an_autoscaling_cluster_is_held_against_what_it_can_grow_to():
    assert unfit_reason(job(workers=8), {"CPU": 2.0}, capacity={"CPU": 64.0}) is None
    reason = unfit_reason(job(workers=8, use_gpu="true"), {"CPU": 2.0}, capacity={"CPU": 64.0, "GPU": 4.0})
    assert reason == "workers=8 needs 1 GPU x 8 = 8 GPUs; the cluster can grow to 4: lower workers, or set use_gpu=false"


def test_default_cpus_split_the_cluster_over_the_most_workers():
    assert worker_resources(job(workers="[1,2]"), {"CPU": 8.0}) == {"CPU": 4}
    assert worker_resources(job(workers=3, batch_size=4095), {"CPU": 2.0, "GPU": 3.0}) == {"CPU": 1, "GPU": 1}


def test_asks_of_several_kinds_add_up_and_a_wait_says_what_is_free():
    """A deploy's replicas and embedding servers (actors/inference.py::deploy_asks) weighed together."""
    asks = [("replicas=2", 2, {"CPU": 1.0, "GPU": 0}), ("servers=2", 2, {"CPU": 0.1, "GPU": 0})]
    assert short_of(asks, {"CPU": 2.2}) is None
    assert pending_text(short_of(asks, {"CPU": 1.5, "GPU": 1.0}), {"CPU": 4.0}, "them") == \
        "replicas=2 needs 1 CPU x 2 + servers=2 needs 0.1 CPU x 2 = 2.2 CPUs; 1.5 free of the cluster's 4"
    assert pending_text(None, {"CPU": 4.0}, "replicas=2 and servers=2") == \
        "waiting for Ray to place replicas=2 and servers=2"
