"""The control plane against a real uvicorn server and a real local Ray: auth, limits, errors, state, jobs over REST.

The tiny training job (its API restarted while it runs) is conftest's `rest_trained_job`; it also feeds
tests/test_serving.py.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import threading
import time

import pytest
import requests
from helpers import remove_placement_groups, resources_still_held

pytestmark = pytest.mark.slow


# ---- auth, limits, errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "wrong", "right+x"])
def test_v1_routes_need_the_token(api, token):
    token = api.token + "x" if token == "right+x" else token
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x"),
                         ("GET", "/v1/models"), ("POST", "/v1/models/x/predict")]:
        response = api.call(method, path, token=token, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert "bearer token" in response.json()["detail"]
    # the token is checked before the body is read: malformed JSON without it is a 401, not a 422
    response = api.call("POST", "/v1/jobs", token=token, data="{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401, response.text


def test_open_routes_and_docs(api):
    assert api.call("GET", "/healthz", token=None).json() == {"status": "ok"}
    assert api.call("GET", "/docs", token=None).status_code == 200
    schema = api.call("GET", "/openapi.json", token=None).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/logs", "/v1/models", "/v1/models/{name}/predict"} <= set(schema["paths"])
    metrics = api.call("GET", "/metrics", token=None).text
    assert 'terarec_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics


def test_bad_config_is_a_422_naming_the_field(api, synth_data, tiny_job):
    response = api.call("POST", "/v1/jobs", json=tiny_job(synth_data, embedding={"dim": 0}))
    assert response.status_code == 422
    assert "config field 'embedding.dim'" in response.json()["detail"]
    response = api.call("POST", "/v1/jobs", json={"config": {"data": synth_data, "stepz": 3}})
    assert response.status_code == 422 and "config field 'stepz': unknown key" in response.json()["detail"]
    response = api.call("POST", "/v1/jobs", json={"config": {"data": synth_data}, "overrides": {"batch_size": -1}})
    assert response.status_code == 422 and "batch_size" in response.json()["detail"]
    response = api.call("POST", "/v1/jobs", data="{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    deep = {"data": synth_data}
    for _ in range(600):
        deep = {"models": deep}
    response = api.call("POST", "/v1/jobs", json={"config": deep})
    assert response.status_code == 422 and "body.config" in response.json()["detail"], response.text
    assert api.call("GET", "/v1/jobs").json()["jobs"] == []  # nothing was submitted


def test_config_files_on_the_host_are_never_read(api, tmp_path):
    """REST takes config objects only: a path is refused unread, so nothing of the file, not even its existence, leaks."""
    secrets = tmp_path / "secret.yaml"
    secrets.write_text("aws_secret_access_key: hunter2-XYZZY\nprivate_token_name: 0xDEADBEEF\n")
    replies = [api.call("POST", "/v1/jobs", json={"config": path}) for path in ("/etc/passwd", str(secrets),
                                                                                  "/no/such/file.yaml")]
    for reply in replies:
        assert reply.status_code == 422 and "body.config" in reply.json()["detail"], reply.text
        assert "hunter2" not in reply.text and "aws_secret" not in reply.text and "DEADBEEF" not in reply.text
        for line in open("/etc/passwd").read().splitlines():
            assert line.split(":")[0] not in reply.json()["detail"].replace("body.config", ""), line
    assert len({reply.json()["detail"] for reply in replies}) == 1  # an existing path reads as a missing one
    assert api.call("GET", "/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize("field, value", [("run_dir", "/tmp/a\x00b"), ("data", "/data/\x1b[31mred"),
                                          ("run_dir", "/tmp/\ud800x"), ("resume_from", "ckpt\n")])
def test_path_fields_refuse_nul_control_characters_and_surrogates(api, synth_data, tiny_job, field, value):
    job = tiny_job(synth_data)
    job["config"][field] = value
    body = json.dumps(job)  # json escapes the lone surrogate as \ud800
    response = api.call("POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert f"config field '{field}'" in response.json()["detail"] and "control characters" in response.json()["detail"]
    response = api.call("POST", "/v1/models", data=json.dumps({"name": "m", "checkpoint": value}),
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "body.checkpoint" in response.json()["detail"], response.text


def test_a_job_that_can_never_fit_is_a_422(api, synth_data, tiny_job):
    """4 CPUs in the test cluster: 64 one-CPU workers can never run; the reply says what is missing and what to change."""
    response = api.call("POST", "/v1/jobs", json=tiny_job(synth_data, workers=64))
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == ("this job can never run on this cluster: workers=64 needs 1 CPU x 64 = 64 CPUs; "
                                         "the cluster has 4: lower workers or cpus_per_worker")
    assert api.call("GET", "/v1/jobs").json()["jobs"] == []


def test_oversize_body_is_a_413(api):
    response = api.call("POST", "/v1/jobs", data=b"{" + b" " * (9 * 1024 * 1024) + b"}",
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(10):
            yield b" " * (1024 * 1024)

    response = api.call("POST", "/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_a_huge_header_is_refused_unread_and_health_stays_quick(api):
    """A 1 MB header without a token is refused as it arrives (h11's bound on a request head), not read whole."""
    port = int(api.url.rsplit(":", 1)[1])
    health: list[float] = []

    def poll_health():
        for _ in range(10):
            started = time.perf_counter()
            assert api.call("GET", "/healthz", token=None, timeout=5).ok
            health.append(time.perf_counter() - started)

    poller = threading.Thread(target=poll_health)
    poller.start()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed
        reply = sock.recv(4096)
    poller.join()
    assert time.perf_counter() - started < 5
    assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 431 Request Header Fields Too Large"), reply[:200]
    assert max(health) < 2, health


def test_unknown_job_is_a_404(api):
    for method, path in [("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/logs"), ("DELETE", "/v1/jobs/nope")]:
        response = api.call(method, path)
        assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_a_directory_that_is_not_a_checkpoint_is_a_422(api, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"secret_key": "hunter2", "step": "x"}))
    response = api.call("POST", "/v1/models", json={"name": "fake", "checkpoint": str(tmp_path)})
    assert response.status_code == 422 and "not a terarec checkpoint" in response.json()["detail"], response.text
    assert "hunter2" not in response.text and "secret_key" not in response.text


def test_ray_dashboard_needs_its_token(ray_cluster):
    """Ray 2.60 runs the local cluster with token auth: the control plane gets in only because it sends the token."""
    response = requests.get(f"http://{ray_cluster.dashboard_url}/api/jobs/", timeout=10)
    assert response.status_code == 401


# ---- state: where it is kept, reads never write, bad records, internal errors -----------------------------------
def test_state_is_private_and_the_first_line_says_where(api):
    home = api.env["TERAREC_HOME"]
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(api.db).st_mode) == 0o600
    first = open(api.log_path).readline()
    assert first.startswith(f"[terarec] serve: listening on {api.url};") and api.db in first, first


def add_record(db: str, job_id: str, status: str, run_dir: str, config: str, age_s: float = 3600) -> None:
    """A job record written `age_s` ago."""
    written = time.time() - age_s
    with sqlite3.connect(db) as connection:
        connection.execute("INSERT INTO jobs VALUES (?, ?, NULL, ?, ?, ?, ?)", (job_id, status, run_dir, config,
                                                                                written, written))


def test_reads_never_write_bad_records_stay_local_and_500s_say_nothing(api_server, tmp_path):
    server = api_server(TERAREC_RECONCILE_SECONDS="3600")
    try:
        # a job Ray never heard of: a GET shows it LOST, but the record is left as it was
        add_record(server.db, "terarec-unknown", "RUNNING", str(tmp_path / "run"), "{}")
        before = open(server.db, "rb").read()
        assert server.call("GET", "/v1/jobs/terarec-unknown").json()["status"] == "LOST"
        assert server.call("GET", "/v1/jobs").json()["jobs"][0]["status"] == "LOST"
        assert open(server.db, "rb").read() == before
        # ... unless it was recorded just now: it is still being submitted (the record is written first)
        add_record(server.db, "terarec-submitting", "PENDING", str(tmp_path / "run"), "{}", age_s=1)
        submitting = server.call("GET", "/v1/jobs/terarec-submitting").json()
        assert (submitting["status"], submitting["message"]) == ("PENDING", "being submitted to Ray")

        # bad records (written before paths were checked, or damaged): a NUL in run_dir, a config that is not JSON
        add_record(server.db, "terarec-nul", "SUCCEEDED", "/tmp/a\x00b", "{}")
        add_record(server.db, "terarec-garbled", "SUCCEEDED", str(tmp_path), "{not json")
        listed = server.call("GET", "/v1/jobs")
        assert listed.status_code == 200, listed.text
        jobs = {job["id"]: job for job in listed.json()["jobs"]}
        assert {job_id: job["status"] for job_id, job in jobs.items()} == {
            "terarec-unknown": "LOST", "terarec-submitting": "PENDING", "terarec-nul": "SUCCEEDED",
            "terarec-garbled": "UNREADABLE"}
        assert jobs["terarec-nul"]["result"] is None  # its files cannot be opened: shown without them

        # an internal error: a generic 500 with a request id; the exception is in the log only
        with open(server.db, "r+b") as stream:
            stream.write(b"this is no SQLite file" * 100)
        response = server.call("GET", "/v1/jobs")
        assert response.status_code == 500
        request_id = response.json()["request_id"]
        assert response.json()["detail"] == f"internal error (request id {request_id}; the control plane's log has it)"
        assert "database" not in response.text.lower()
    finally:
        server.stop()
    log = open(server.log_path).read()
    assert f"request {request_id}" in log and "DatabaseError" in log


# ---- jobs ------------------------------------------------------------------------------------------------------
def test_job_runs_to_success_across_an_api_restart(rest_trained_job):
    running, after, done = rest_trained_job["running"], rest_trained_job["after_restart"], rest_trained_job["done"]
    assert after["id"] == running["id"] and after["status"] in {"RUNNING", "SUCCEEDED"}
    assert done["result"]["steps"] == 20 and 0.5 < done["result"]["auc"] <= 1
    assert done["progress"]["step"] == 20 and done["progress"]["loss"] > 0
    assert done["checkpoint"] and os.path.isfile(os.path.join(done["checkpoint"], "meta.json"))
    assert sorted(rest_trained_job["checkpoints"]) == [10, 20]
    assert done["dashboard_url"].endswith(f"/#/jobs/{done['id']}")
    assert done["run_dir"].startswith(rest_trained_job["storage"])
    assert [job["id"] for job in rest_trained_job["listed"]] == [done["id"]]
    assert "[terarec] done:" in rest_trained_job["logs"]
    assert rest_trained_job["recorded_status"] == "SUCCEEDED"  # written by the background reconciler, not a GET


def test_stop_a_job(api, synth_data, tiny_job):
    submitted = api.call("POST", "/v1/jobs", json=tiny_job(synth_data, steps=100_000))
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    assert api.call("DELETE", f"/v1/jobs/{job_id}").status_code == 200
    assert api.wait_for(job_id, {"STOPPED"}, timeout=60)["status"] == "STOPPED"
    # and stopped for real: its workers gone, the cluster free (a leak is removed here, so that it fails this test
    # alone rather than every later one that needs the CPUs)
    held = resources_still_held(timeout_s=30)
    if held:
        remove_placement_groups()
    assert held is None, f"job {job_id} is STOPPED but its resources are still held: {held}"
