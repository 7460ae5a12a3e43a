"""Shared fixtures: one real local Ray for the session, small synthetic datasets on disk."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch
from helpers import free_port

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
os.environ["RAY_AUTH_MODE"] = "token"  # before anything imports ray: it reads the mode once, at import


def pytest_configure(config):
    """Without CUDA, Triton kernels run in Triton's interpreter, for the whole session: Triton reads
    TRITON_INTERPRET when a kernel is defined, so it must be set before any test module imports one
    (set once here, the results do not depend on which test file is collected first)."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray head of this session's own: `ray start --head --block` on free loopback ports and its own
    temp dir, so several sessions on one machine never share an agent port or find each other's cluster.

    Token auth as Ray 2.60 runs it (RAY_AUTH_MODE=token, the token at ~/.ray/auth_token, made if missing).
    RAY_ADDRESS is exported to this process and every process it starts; stopping ends the blocking head
    process, never `ray stop` (which would stop every cluster on the machine).
    """
    import ray

    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--dashboard-agent-listen-port",
                                             "--dashboard-agent-grpc-port", "--metrics-export-port",
                                             "--node-manager-port", "--object-manager-port",
                                             "--runtime-env-agent-port", "--ray-client-server-port")}
    first_worker_port = random.randrange(20_000, 60_000, 100)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    bin_dir = os.path.dirname(sys.executable)  # this venv's `ray` and `terarec`, as if it were activated
    env = os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    ray_cli = os.path.join(bin_dir, "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    command = [ray_cli, "start", "--head", "--block", "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats",
               "--min-worker-port", str(first_worker_port), "--max-worker-port", str(first_worker_port + 99)]
    command += [str(item) for pair in ports.items() for item in pair]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{ports['--port']}"
    os.environ["RAY_ADDRESS"] = address
    try:
        deadline = time.monotonic() + 120
        while not ray.is_initialized():
            assert head.poll() is None, open(log.name).read()
            try:
                ray.init(address=address, log_to_driver=True)
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield types.SimpleNamespace(address=address, dashboard_url=f"127.0.0.1:{ports['--dashboard-port']}")
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # our own head's process group, nothing else
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api(ray_cluster, tmp_path_factory):
    """`terarec serve` against the session's Ray, on a free loopback port, for one test module."""
    from helpers import ApiServer

    server = ApiServer(ray_cluster, tmp_path_factory.mktemp("api"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """20k rows of synthetic Criteo-shaped data (train/ + eval/), one click task."""
    from terarec.core.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), rows=20_000, seed=3, cardinality_scale=1e-4)
    return str(out)
