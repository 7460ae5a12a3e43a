"""Shared fixtures: one real local Ray for the session, small synthetic datasets on disk, the REST control plane."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch
from helpers import free_port as _free_port
from helpers import ray_start_command, wait_until_cluster_idle

from terarec.core.checkpoints import find_checkpoints

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
def free_port():
    """free_port(): a TCP port free on loopback right now."""
    return _free_port


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray head of this session's own: `ray start --head --block` on free loopback ports and its own
    temp dir, so several sessions on one machine never share an agent port or find each other's cluster.

    Token auth as Ray 2.60 runs it (RAY_AUTH_MODE=token, the token at ~/.ray/auth_token, made if missing).
    RAY_ADDRESS is exported to this process and every process it starts; stopping ends the blocking head
    process, never `ray stop` (which would stop every cluster on the machine).
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    bin_dir = os.path.dirname(sys.executable)  # this venv's `ray` and `terarec`, as if it were activated
    env = os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    subprocess.run([os.path.join(bin_dir, "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True)
    command, ports = ray_start_command(temp_dir, num_cpus=4)
    address = f"127.0.0.1:{ports['--port']}"
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
            head.wait(timeout=10)  # a graceful stop of every Ray process takes ~30 s; the cluster is ours and spent
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # our own head's process group, nothing else
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def idle_ray_cluster(ray_cluster):
    """The session's Ray with all its CPUs free, for tests that run `terarec train` with its default resources."""
    wait_until_cluster_idle()
    return ray_cluster


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """20k rows of synthetic Criteo-shaped data (train/ + eval/), one click task."""
    from terarec.core.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), rows=20_000, seed=3, cardinality_scale=1e-4)
    return str(out)


# ---- the REST control plane (tests/test_api.py, tests/test_serving.py) -------------------------------------------
API_TOKEN = "test-" + os.urandom(8).hex()


class HttpEndpoint:
    """Calls to a terarec HTTP server at `url` (the control plane, or an inference replica's own ingress) with the
    test token."""

    token = API_TOKEN

    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, token: str | None = API_TOKEN, **kwargs):
        import requests

        headers = kwargs.pop("headers", {}) | ({"Authorization": f"Bearer {token}"} if token else {})
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)


class ApiServer(HttpEndpoint):
    """`terarec serve` in a subprocess on a free loopback port; `restart()` kills it and starts another on the same DB."""

    def __init__(self, workdir, **env):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.env = os.environ | {
            "TERAREC_API_TOKEN": API_TOKEN, "TERAREC_STORAGE": os.path.join(self.workdir, "runs"),
            "TERAREC_HOME": os.path.join(self.workdir, "state"),
            "TERAREC_TRAIN_COMMAND": f"{sys.executable} -m terarec.platform.cli train"} | env
        self.db = os.path.join(self.env["TERAREC_HOME"], "jobs.db")
        self.start()

    def start(self) -> None:
        import requests

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(self.workdir, f"api-{port}.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "terarec.platform.cli", "serve", "--port", str(port)],
                                        cwd=self.workdir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.process.poll() is None, open(self.log_path).read()
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise AssertionError(f"the API did not come up: {open(self.log_path).read()}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.log.close()

    def restart(self) -> None:
        self.stop(signal.SIGKILL)  # a crash, not a clean shutdown
        self.start()

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 150) -> dict:
        """Poll GET /v1/jobs/ID until the job reaches one of `statuses`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.call("GET", f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            assert job["status"] in {"PENDING", "RUNNING"}, job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {job}\n"
                             f"{self.call('GET', f'/v1/jobs/{job_id}/logs').json()['logs'][-3000:]}")


def _tiny_job(data: str, **config) -> dict:
    # eval_every=0: one evaluation, at the end (these tests check jobs, not steering; it keeps the suite short)
    return {"config": {"data": data, "steps": 20, "batch_size": 256, "eval_rows": 2000, "eval_every": 0, "log_every": 5,
                       "checkpoint_every": 10, "cpus_per_worker": 1, "embedding": {"dim": 8, "num_buckets": 64},
                       "models": {"dlrm": {"bottom_mlp": [16], "top_mlp": [16]}}} | config}


@pytest.fixture(scope="session")
def tiny_job():
    """tiny_job(data, **config): a POST /v1/jobs body that trains a small DLRM for 20 steps, checkpoints at 10 and 20."""
    return _tiny_job


@pytest.fixture
def api_server(ray_cluster, tmp_path):
    """api_server(**env): one more `terarec serve` for this test (its own state), stopped afterwards."""
    servers = []

    def start(**env) -> ApiServer:
        servers.append(ApiServer(tmp_path / f"api-{len(servers)}", **env))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def api(ray_cluster, tmp_path_factory):
    """The module's `terarec serve` (its own state directory and storage)."""
    server = ApiServer(tmp_path_factory.mktemp("api"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rest_trained_job(ray_cluster, synth_data, tmp_path_factory) -> dict:
    """The tiny job submitted over REST, its API killed and restarted while it runs, polled to SUCCEEDED.

    Returns the job's views: while running, right after the restart, done; and `checkpoints` (step -> directory).
    """
    server = ApiServer(tmp_path_factory.mktemp("trained-api"), TERAREC_RECONCILE_SECONDS="0.5")
    try:
        submitted = server.call("POST", "/v1/jobs", json=_tiny_job(synth_data))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        running = server.wait_for(job_id, {"RUNNING", "SUCCEEDED"})
        server.restart()
        again = server.call("GET", f"/v1/jobs/{job_id}")
        assert again.status_code == 200, again.text
        done = server.wait_for(job_id, {"SUCCEEDED"})
        listed = server.call("GET", "/v1/jobs").json()["jobs"]
        logs = server.call("GET", f"/v1/jobs/{job_id}/logs").json()["logs"]
        recorded = None
        for _ in range(40):  # the background reconciler copies Ray's final status into the record
            with sqlite3.connect(server.db) as db:
                recorded = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if recorded == "SUCCEEDED":
                break
            time.sleep(0.25)
    finally:
        server.stop()
    checkpoints = find_checkpoints(done["run_dir"])
    return {"running": running, "after_restart": again.json(), "done": done, "listed": listed, "logs": logs,
            "recorded_status": recorded,
            "storage": server.env["TERAREC_STORAGE"], "checkpoints": checkpoints}
