"""The control plane against a real uvicorn server and a real local Ray: auth, limits, errors, jobs over REST.

The tiny training job submitted here (its API restarted while it runs) also feeds tests/test_serving.py.
"""
from __future__ import annotations

import os

import pytest
import requests
from helpers import TOKEN, tiny_job, trained_job, wait_for

from terarec.core.checkpoints import find_checkpoints

pytestmark = pytest.mark.slow


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
