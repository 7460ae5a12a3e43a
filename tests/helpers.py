"""Helpers several test files share (not a test file: pytest collects nothing here): a free port, the small
sharded training job of the Ray tests and how to compare two runs' final states, and the control plane run as `terarec serve` in a subprocess with the
tiny training job it runs once per session."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import requests
import torch

from terarec.core.checkpoints import find_checkpoints, open_checkpoint
from terarec.core.config import TrainConfig, load_config
from terarec.core.resources import unfit_reason

TOKEN = secrets.token_hex(16)
JOB_STEPS = 6


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_overrides(workers, **extra) -> list[str]:
    """--set key=value settings of the small job (also passed to the CLI)."""
    settings = {"workers": workers, "cpus_per_worker": 0.5, "embedding.dim": 8, "dlrm.bottom_mlp": "[16]",
                "dlrm.top_mlp": "[16]", "embedding.num_buckets": 64, "embedding.optimizer": "adam", "embedding.lr": 0.02,
                "eval_rows": 2000, "log_every": 2, "steps": JOB_STEPS, "batch_size": 240, "seed": 5} | extra
    return [f"{key}={value}" for key, value in settings.items()]


def job(data, run_dir, workers, **extra) -> TrainConfig:
    """The small DLRM job of the Ray tests at `workers` (N or "[min,max]"), with `extra` settings; the test
    skips where this machine can never hold it (2 GPU workers on one GPU)."""
    import pytest
    import ray

    config = load_config(overrides=job_overrides(workers, **extra), flags={"data": data, "run_dir": str(run_dir)})
    reason = unfit_reason(config, ray.cluster_resources())
    if reason:
        pytest.skip(f"this machine cannot hold the job: {reason}")
    return config


def final_state(metrics):
    """(dense params, keys sorted, values sorted) of the run's final checkpoint."""
    checkpoint = open_checkpoint(metrics["checkpoint"])
    keys, values = checkpoint.load_rows().export()
    return checkpoint.dense_state["model"], keys, values


def assert_same_training(a, b):
    dense_a, keys_a, values_a = a
    dense_b, keys_b, values_b = b
    assert dense_a.keys() == dense_b.keys()
    for name in dense_a:
        torch.testing.assert_close(dense_a[name], dense_b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(keys_a, keys_b)
    torch.testing.assert_close(values_a, values_b, rtol=1e-4, atol=1e-5)


def checkpoint_at(run_dir, step):
    checkpoints = find_checkpoints(str(run_dir))
    assert step in checkpoints, f"no checkpoint at step {step} under {run_dir}: {sorted(checkpoints)}"
    return checkpoints[step]


class ApiServer:
    """`terarec serve` in a subprocess on a free loopback port; `restart()` kills it and starts another on the same DB."""

    def __init__(self, ray_cluster, workdir, **env):
        self.workdir = str(workdir)
        self.env = os.environ | {
            "TERAREC_API_TOKEN": TOKEN, "TERAREC_STORAGE": os.path.join(self.workdir, "runs"),
            "TERAREC_RAY_DASHBOARD_URL": f"http://{ray_cluster.dashboard_url}",
            "TERAREC_TRAIN_COMMAND": f"{sys.executable} -m terarec.platform.cli train"} | env
        self.db = os.path.join(self.workdir, "jobs.db")
        self.process = None
        self.start()

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(self.workdir, f"api-{port}.log"), "w")
        self.process = subprocess.Popen([sys.executable, "-m", "terarec.platform.cli", "serve", "--port", str(port),
                                         "--db", self.db], cwd=self.workdir, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.process.poll() is None, open(self.log.name).read()
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise AssertionError(f"the API did not come up: {open(self.log.name).read()}")

    def stop(self, sig=signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.log.close()

    def restart(self) -> None:
        self.stop(signal.SIGKILL)  # a crash, not a clean shutdown
        self.start()

    def call(self, method: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {}) | ({"Authorization": f"Bearer {token}"} if token else {})
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)


def tiny_job(data: str, **config) -> dict:
    return {"config": {"data": data, "steps": 20, "batch_size": 256, "eval_rows": 2000, "log_every": 5,
                       "checkpoint_every": 10, "cpus_per_worker": 1, "embedding": {"dim": 8, "num_buckets": 64},
                       "models": {"dlrm": {"bottom_mlp": [16], "top_mlp": [16]}}} | config}


def wait_for(api: ApiServer, job_id: str, statuses: set[str], timeout: float = 150) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.call("GET", f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert job["status"] in {"PENDING", "RUNNING"}, job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {job}\n"
                         f"{api.call('GET', f'/v1/jobs/{job_id}/logs').json()['logs'][-3000:]}")


_TRAINED: dict = {}


def trained_job(api: ApiServer, data: str) -> dict:
    """Submit the tiny job over REST, restart the API while it runs, poll it to SUCCEEDED (once per session)."""
    if not _TRAINED:
        submitted = api.call("POST", "/v1/jobs", json=tiny_job(data))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        running = wait_for(api, job_id, {"RUNNING", "SUCCEEDED"})
        api.restart()
        again = api.call("GET", f"/v1/jobs/{job_id}")
        assert again.status_code == 200, again.text
        done = wait_for(api, job_id, {"SUCCEEDED"})
        _TRAINED.update(running=running, after_restart=again.json(), done=done)
    return _TRAINED
