"""The control plane against a real uvicorn server and a real local Ray: auth, limits, errors, jobs over REST.

The tiny training job submitted here (its API restarted while it runs) also feeds tests/test_serving.py.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from terarec.core.checkpoints import find_checkpoints

pytestmark = pytest.mark.slow
TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="module")
def api(ray_cluster, tmp_path_factory):
    server = ApiServer(ray_cluster, tmp_path_factory.mktemp("api"))
    yield server
    server.stop()


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


# ---- auth, limits, errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_v1_routes_need_the_token(api, token):
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x"),
                         ("GET", "/v1/models"), ("POST", "/v1/models/x/predict")]:
        response = api.call(method, path, token=token, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert "bearer token" in response.json()["detail"]


def test_open_routes_and_docs(api):
    assert api.call("GET", "/healthz", token=None).json() == {"status": "ok"}
    assert api.call("GET", "/docs", token=None).status_code == 200
    schema = api.call("GET", "/openapi.json", token=None).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/logs", "/v1/models", "/v1/models/{name}/predict"} <= set(schema["paths"])
    metrics = api.call("GET", "/metrics", token=None).text
    assert 'terarec_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics


def test_bad_config_is_a_422_naming_the_field(api, synth_data):
    response = api.call("POST", "/v1/jobs", json=tiny_job(synth_data, embedding={"dim": 0}))
    assert response.status_code == 422
    assert "config field 'embedding.dim'" in response.json()["detail"]
    response = api.call("POST", "/v1/jobs", json={"config": {"data": synth_data, "stepz": 3}})
    assert response.status_code == 422 and "config field 'stepz': unknown key" in response.json()["detail"]
    response = api.call("POST", "/v1/jobs", json={"config": {"data": synth_data}, "overrides": {"batch_size": -1}})
    assert response.status_code == 422 and "batch_size" in response.json()["detail"]
    response = api.call("POST", "/v1/jobs", data="{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    assert api.call("GET", "/v1/jobs").json()["jobs"] == []  # nothing was submitted


def test_oversize_body_is_a_413(api):
    response = api.call("POST", "/v1/jobs", data=b"{" + b" " * (9 * 1024 * 1024) + b"}",
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(10):
            yield b" " * (1024 * 1024)

    response = api.call("POST", "/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_unknown_job_is_a_404(api):
    for method, path in [("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/logs"), ("DELETE", "/v1/jobs/nope")]:
        response = api.call(method, path)
        assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_ray_dashboard_needs_its_token(ray_cluster):
    """Ray 2.60 runs the local cluster with token auth: the control plane gets in only because it sends the token."""
    response = requests.get(f"http://{ray_cluster.dashboard_url}/api/jobs/", timeout=10)
    assert response.status_code == 401


# ---- jobs ------------------------------------------------------------------------------------------------------
def test_job_runs_to_success_across_an_api_restart(api, synth_data):
    trained = trained_job(api, synth_data)
    running, after, done = trained["running"], trained["after_restart"], trained["done"]
    assert after["id"] == running["id"] and after["status"] in {"RUNNING", "SUCCEEDED"}
    assert done["result"]["steps"] == 20 and 0.5 < done["result"]["auc"] <= 1
    assert done["progress"]["step"] == 20 and done["progress"]["loss"] > 0
    assert done["checkpoint"] and os.path.isfile(os.path.join(done["checkpoint"], "meta.json"))
    assert sorted(find_checkpoints(done["run_dir"])) == [10, 20]
    assert done["dashboard_url"].endswith(f"/#/jobs/{done['id']}")
    assert done["run_dir"].startswith(api.env["TERAREC_STORAGE"])
    listed = api.call("GET", "/v1/jobs").json()["jobs"]
    assert [job["id"] for job in listed] == [done["id"]]
    logs = api.call("GET", f"/v1/jobs/{done['id']}/logs").json()["logs"]
    assert "[terarec] done:" in logs


def test_stop_a_job(api, synth_data):
    submitted = api.call("POST", "/v1/jobs", json=tiny_job(synth_data, steps=100_000))
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    assert api.call("DELETE", f"/v1/jobs/{job_id}").status_code == 200
    assert wait_for(api, job_id, {"STOPPED"}, timeout=60)["status"] == "STOPPED"
