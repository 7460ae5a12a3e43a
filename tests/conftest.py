"""Shared fixtures: one real local Ray for the session, small synthetic datasets on disk."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (dashboard on loopback, for the Jobs API); its address is exported as RAY_ADDRESS."""
    import ray

    context = ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                       log_to_driver=True, ignore_reinit_error=True)
    address = context.address_info["address"]
    os.environ["RAY_ADDRESS"] = address
    yield context
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """20k rows of synthetic Criteo-shaped data (train/ + eval/), one click task."""
    from terarec.core.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), rows=20_000, seed=3, cardinality_scale=1e-4)
    return str(out)
