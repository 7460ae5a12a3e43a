"""Online inference: embedding servers on the store's tiers and the replica's recent-rows cache (plain classes, no
Ray); then over REST: the README's serving walk, then the REST-trained checkpoint deployed on Ray Serve, predicted,
rolled out, cleaned up, and the online-learning loop (resume on new IDs, roll out).

Served scores must equal the offline model's (the checkpoint loaded in this process) on the same rows.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import requests
import torch
from conftest import HttpEndpoint
from helpers import resources_still_held

from terarec.actors.embedding_server import NAMESPACE, EmbeddingShard, RecentRows, server_names
from terarec.actors.inference import model_from_checkpoint, score
from terarec.core.checkpoints import find_checkpoints, open_checkpoint
from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS, transform_dense
from terarec.store import feature_keys

pytestmark = pytest.mark.slow
MODEL = "ctr"


README_ROW = {"dense": [1, 0, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2], "sparse": list(range(1, 27))}


def test_the_readme_serving_walk(ray_cluster, synth_data, tiny_job, free_port, tmp_path):
    """README "Serving and the REST control plane", step by step, in a user's environment: a running Ray
    (RAY_ADDRESS), the venv's commands on PATH, TERAREC_API_TOKEN exported and nothing else of terarec's or Ray's
    auth; then `terarec serve --port P`, POST /v1/jobs, GET until done, POST /v1/models, POST predict."""
    token = os.urandom(16).hex()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TERAREC_", "RAY_AUTH_"))}
    env |= {"TERAREC_API_TOKEN": token, "XDG_DATA_HOME": str(tmp_path / "data-home"),  # the user's data dir
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")}
    port = free_port()
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "terarec"), "serve", "--port", str(port)],
                                  cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not _answers(f"{url}/healthz"):
            assert server.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        state = tmp_path / "data-home" / "terarec"
        assert log_path.read_text().splitlines()[0] == (f"[terarec] serve: listening on {url}; job records in "
                                                        f"{state / 'jobs.db'} (state directory {state})")

        submitted = requests.post(f"{url}/v1/jobs", headers=headers, json=tiny_job(synth_data), timeout=60)
        assert submitted.status_code == 201, submitted.text
        job_id, deadline = submitted.json()["id"], time.time() + 180
        while (job := requests.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=30).json())["status"] != "SUCCEEDED":
            assert job["status"] in {"PENDING", "RUNNING"} and time.time() < deadline, job
            time.sleep(1)

        deployed = requests.post(f"{url}/v1/models", headers=headers, timeout=120,
                                 json={"name": "readme", "checkpoint": job["checkpoint"], "replicas": 1})
        assert deployed.status_code == 200, deployed.text + log_path.read_text()[-3000:]
        predicted = requests.post(f"{url}/v1/models/readme/predict", headers=headers, json={"rows": [README_ROW]},
                                  timeout=60)
        assert predicted.status_code == 200, predicted.text
        [[score]] = predicted.json()["scores"]
        assert 0 < score < 1
        assert requests.delete(f"{url}/v1/models/readme", headers=headers, timeout=60).status_code == 204
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def local_checkpoint(synth_data, tmp_path_factory) -> str:
    """A DLRM checkpoint trained in this process for a few steps (no Ray)."""
    from terarec.actors.train_worker import TrainWorker
    from terarec.core.config import load_config
    from terarec.kernels.comm import LocalCommunicator

    run_dir = tmp_path_factory.mktemp("local-run")
    config = load_config(tree={"data": synth_data, "run_dir": str(run_dir), "steps": 4, "batch_size": 512,
                               "log_every": 4})
    worker = TrainWorker(config, LocalCommunicator(), torch.device("cpu"))
    worker.train()
    worker.save(str(run_dir))
    return str(run_dir)


def test_a_tiered_server_reads_what_an_in_memory_one_reads(local_checkpoint, tmp_path):
    in_memory = EmbeddingShard(local_checkpoint, rank=1, num_servers=2)
    keys, _ = in_memory.store.export()
    slot_bytes = in_memory.store.value_width * 4 + 64
    for store in ({"kind": "cached_host", "cache_bytes": len(keys) * slot_bytes / 4},
                  {"kind": "cached_ssd", "cache_bytes": len(keys) * slot_bytes / 4, "path": str(tmp_path)}):
        tiered = EmbeddingShard(local_checkpoint, rank=1, num_servers=2, store=store)
        assert tiered.rows() == in_memory.rows() == len(keys) > 0
        all_keys, all_rows = tiered.all_rows(limit=len(keys))  # what a replica's cache starts with
        assert torch.equal(all_keys, keys) and torch.equal(all_rows, in_memory.lookup(keys))
        assert tiered.all_rows(limit=len(keys) - 1)[0].numel() == 0  # more than the replica's share: none
        assert tiered.metrics()["cache_capacity_rows"] < len(keys) / 3  # the table is 4x the cache
        for piece in torch.split(keys[torch.randperm(len(keys))], 97):
            torch.testing.assert_close(tiered.lookup(piece), in_memory.lookup(piece), rtol=0, atol=0)
        hot = keys[:40]
        for _ in range(3):  # the hot keys stay in the cache: hits
            torch.testing.assert_close(tiered.lookup(hot), in_memory.lookup(hot), rtol=0, atol=0)
        unseen = torch.tensor([-12345, 2**62 + 7])
        assert torch.equal(tiered.lookup(unseen), torch.zeros(2, tiered.dim)) and tiered.rows() == len(keys)
        metrics = tiered.metrics()
        assert 0 < metrics["cache_hit_rate"] < 1 and metrics["cache_evictions"] > 0, metrics


def test_recent_rows_answer_what_they_hold_until_full_or_too_old():
    recent = RecentRows(dim=3, capacity=4, max_age_s=0.2)
    keys, rows = torch.tensor([5, -9, 2**40]), torch.arange(9, dtype=torch.float32).reshape(3, 3)
    recent.add(keys, rows)
    held, held_rows = recent.find(torch.tensor([7, 2**40, 5]))
    assert held.tolist() == [1, 2] and torch.equal(held_rows, rows[[2, 0]])
    assert (recent.hits, recent.lookups) == (2, 3)
    recent.add(torch.tensor([7, 8]), torch.ones(2, 3))  # 5 rows > capacity 4: a new generation holds only these
    assert recent.find(keys)[0].numel() == 0 and recent.find(torch.tensor([8]))[0].tolist() == [0]
    time.sleep(0.3)
    assert recent.find(torch.tensor([7, 8]))[0].numel() == 0  # older than max_age_s: asked again


def test_recent_rows_are_renewed_past_half_their_max_age():
    recent = RecentRows(dim=3, capacity=4, max_age_s=0.4)
    keys, rows = torch.tensor([5, -9, 2**40]), torch.arange(9, dtype=torch.float32).reshape(3, 3)
    assert not recent.renewal_due()  # nothing held
    recent.add(keys, rows)
    assert not recent.renewal_due()
    time.sleep(0.25)
    assert recent.renewal_due() and sorted(recent.held_keys().tolist()) == sorted(keys.tolist())
    recent.renew(keys, rows + 1, asked_at=time.monotonic())  # the servers' answers: a generation as old as the ask
    assert not recent.renewal_due() and torch.equal(recent.find(keys)[1], rows + 1)


@pytest.fixture(scope="module", autouse=True)
def leaves_the_cluster_free(ray_cluster):
    """The module ends with every CPU and GPU of the session's cluster free, or fails naming what still holds one
    (then frees it: in CI a leaked replica made later training tests wait for its CPU)."""
    yield
    held = resources_still_held(timeout_s=20)
    if held:
        from ray import serve

        serve.shutdown()
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == NAMESPACE:
                ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE), no_restart=True)
    assert not held, f"test_serving.py left resources held: {held}"


@pytest.fixture(scope="module")
def checkpoints(rest_trained_job) -> dict[int, str]:
    return rest_trained_job["checkpoints"]


@pytest.fixture(scope="module")
def served(api, checkpoints):
    response = api.call("POST", "/v1/models", json={"name": MODEL, "checkpoint": checkpoints[20], "servers": 2})
    assert response.status_code == 200, response.text
    yield response.json()
    from ray import serve

    for name in [model["name"] for model in api.call("GET", "/v1/models").json()["models"]]:
        assert api.call("DELETE", f"/v1/models/{name}").status_code == 204
    assert api.call("GET", f"/v1/models/{MODEL}").status_code == 404
    assert not [actor for actor in ray.util.list_named_actors(all_namespaces=True) if actor["namespace"] == NAMESPACE]
    serve.shutdown()


def eval_rows(data: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """dense [n, 13] (stored, log-transformed) and sparse [n, 26] raw IDs of the first eval rows."""
    table = pq.read_table(sorted(glob.glob(f"{data}/eval/*.parquet"))[0]).slice(0, count)
    dense = np.stack([table[name].to_numpy() for name in DENSE_COLUMNS], axis=1).astype(np.float32)
    sparse = np.stack([table[name].to_numpy() for name in SPARSE_COLUMNS], axis=1).astype(np.int64)
    return dense, sparse


def offline_scores(checkpoint_dir: str, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    checkpoint = open_checkpoint(checkpoint_dir)
    model = model_from_checkpoint(checkpoint, checkpoint.load_rows())
    return score(model, torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()


def predict(api, dense, sparse, model=MODEL, transformed=True, **kwargs):
    rows = [{"dense": d.tolist(), "sparse": s.tolist()} for d, s in zip(dense, sparse)]
    return api.call("POST", f"/v1/models/{model}/predict", json={"rows": rows, "transformed": transformed}, **kwargs)


ARROW = {"Content-Type": "application/vnd.apache.arrow.stream"}


def arrow_stream(columns: dict) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def arrow_body(dense: np.ndarray, sparse: np.ndarray, **more) -> bytes:
    """The rows as an Arrow IPC stream of terarec's parquet columns (plus `more` columns)."""
    return arrow_stream({name: dense[:, i] for i, name in enumerate(DENSE_COLUMNS)}
                        | {name: sparse[:, i] for i, name in enumerate(SPARSE_COLUMNS)} | more)


def replica(api, model: str = MODEL) -> HttpEndpoint:
    """The model's one replica's own ingress, as GET /v1/models/NAME lists it."""
    endpoints = api.call("GET", f"/v1/models/{model}").json()["endpoints"]
    assert len(endpoints) == 1, endpoints
    return HttpEndpoint(endpoints[0])


def server_rows(model: str, checkpoint_dir: str, servers: int) -> list[int]:
    names = server_names(model, open_checkpoint(checkpoint_dir), servers)
    return ray.get([ray.get_actor(name, namespace=NAMESPACE).rows.remote() for name in names])


def test_served_scores_equal_the_offline_model(api, served, checkpoints, synth_data):
    assert served["status"] == "RUNNING" and served["step"] == 20 and served["servers"] == 2
    assert served["tasks"] == ["label"]
    assert served["recent_rows"] == sum(server_rows(MODEL, checkpoints[20], 2)) > 0  # the replica started warm
    dense, sparse = eval_rows(synth_data, 300)
    before = api.call("GET", f"/v1/models/{MODEL}").json()
    response = predict(api, dense, sparse)
    assert response.status_code == 200, response.text
    response_json = response.json()
    scores = np.array(response_json["scores"])
    assert scores.shape == (300, 1)
    np.testing.assert_allclose(scores, offline_scores(checkpoints[20], dense, sparse), atol=1e-5, rtol=0)
    # the same rows as an Arrow body (with a label column, ignored): an Arrow reply of the same scores
    body = arrow_body(dense, sparse, label=np.zeros(300, dtype=np.int8))
    response = api.call("POST", f"/v1/models/{MODEL}/predict?transformed=true", data=body, headers=ARROW)
    assert response.status_code == 200 and response.headers["content-type"] == ARROW["Content-Type"], response.text
    replied_bytes = response.content
    replied = pa.ipc.open_stream(replied_bytes).read_all()
    np.testing.assert_allclose(np.stack(replied.column("scores").to_numpy(zero_copy_only=False)), scores, atol=1e-6, rtol=0)
    # the replica's own ingress answers the same, with the same token, without the control plane's hop
    direct = predict(replica(api), dense, sparse)
    assert direct.status_code == 200 and direct.json() == response_json, direct.text
    response = replica(api).call("POST", f"/v1/models/{MODEL}/predict?transformed=true", data=body, headers=ARROW)
    assert response.status_code == 200 and response.content == replied_bytes
    after = api.call("GET", f"/v1/models/{MODEL}").json()  # the replica's counters: 4 requests of 300 rows, 4 forwards
    assert (after["forwards"] - before["forwards"], after["forward_rows"] - before["forward_rows"]) == (4, 1200), after


def test_raw_dense_values_get_the_converter_transform(api, served, checkpoints, synth_data):
    _, sparse = eval_rows(synth_data, 8)
    raw = np.random.default_rng(0).integers(-3, 5000, size=(8, 13)).astype(np.float32)
    response = predict(api, raw, sparse, transformed=False)
    assert response.status_code == 200, response.text
    expected = offline_scores(checkpoints[20], transform_dense(raw), sparse)
    np.testing.assert_allclose(np.array(response.json()["scores"]), expected, atol=1e-5, rtol=0)


def test_unseen_ids_read_the_default_row_and_are_not_inserted(api, served, checkpoints):
    before = server_rows(MODEL, checkpoints[20], 2)
    rng = np.random.default_rng(1)
    dense, sparse = rng.random((16, 13)).astype(np.float32), rng.integers(-2**62, 2**62, size=(16, 26))
    response = predict(api, dense, sparse)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["scores"]), offline_scores(checkpoints[20], dense, sparse), atol=1e-5)
    assert server_rows(MODEL, checkpoints[20], 2) == before


def test_bad_predict_requests(api, served):
    """The same one-line errors from the control plane and from a replica's own ingress."""
    for target in (api, replica(api)):
        bad_predict_requests(target)
    direct = replica(api)
    response = direct.call("POST", f"/v1/models/{MODEL}/predict", token=None, json={"rows": []})
    assert response.status_code == 401 and "missing bearer token" in response.json()["detail"]
    response = direct.call("POST", f"/v1/models/{MODEL}/predict", token="wrong", json={"rows": []})
    assert response.status_code == 401 and "wrong bearer token" in response.json()["detail"]
    response = direct.call("POST", "/v1/models/nope/predict", json={"rows": []})
    assert response.status_code == 404 and "no model 'nope' on this replica" in response.json()["detail"]


def bad_predict_requests(api):
    good = {"dense": [0.5] * 13, "sparse": list(range(26))}
    cases = {
        "rows.0.dense": {"rows": [good | {"dense": [0.5] * 12}]},
        "rows.0.sparse": {"rows": [good | {"sparse": list(range(27))}]},
        "rows.0.sparse.3": {"rows": [good | {"sparse": [0, 1, 2, 3.5] + list(range(22))}]},
        "rows.0.sparse.0": {"rows": [good | {"sparse": ["7"] + list(range(25))}]},
        "rows.0.sparse.1": {"rows": [good | {"sparse": [0, 2**63] + list(range(24))}]},
        "body.rows": {"rows": []},
        "body.extra": {"rows": [good], "extra": 1},
    }
    for field, body in cases.items():
        response = api.call("POST", f"/v1/models/{MODEL}/predict", json=body)
        assert response.status_code == 422, (field, response.text)
        assert field in response.json()["detail"], (field, response.json())
    nan = '{"rows": [{"dense": [NaN, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "sparse": [%s]}]}' % ", ".join(["1"] * 26)
    response = api.call("POST", f"/v1/models/{MODEL}/predict", data=nan, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "finite" in response.json()["detail"]
    huge = {"rows": [good | {"dense": [1e308] + [0.5] * 12}], "transformed": True}  # finite in JSON, inf as float32
    response = api.call("POST", f"/v1/models/{MODEL}/predict", json=huge)
    assert response.status_code == 422 and "rows.0.dense.0" in response.json()["detail"], response.text
    response = api.call("POST", f"/v1/models/{MODEL}/predict", json={"rows": [good] * 5000})
    assert response.status_code == 413 and "at most 4096" in response.json()["detail"]
    response = api.call("POST", f"/v1/models/{MODEL}/predict", json={"rows": [good] * 120_000})
    assert response.status_code == 413
    dense, sparse = np.full((2, 13), 0.5, dtype=np.float32), np.arange(52).reshape(2, 26)
    arrow_cases = {"not an Arrow IPC stream": json.dumps({"rows": [good]}).encode(),
                   "lacks the column(s) C26": arrow_stream({name: dense[:, 0] for name in DENSE_COLUMNS}
                                                           | {name: sparse[:, 0] for name in SPARSE_COLUMNS[:-1]}),
                   "column C3 is double": arrow_body(dense, sparse, C3=np.full(2, 0.5)),
                   "column I2 has 1 null": arrow_body(dense, sparse, I2=pa.array([0.5, None])),
                   "rows.1.dense.0: not finite": arrow_body(dense, sparse, I1=np.array([0.5, np.inf]))}
    for detail, body in arrow_cases.items():
        response = api.call("POST", f"/v1/models/{MODEL}/predict?transformed=true", data=body, headers=ARROW)
        assert response.status_code == 422 and detail in response.json()["detail"], (detail, response.text)
    response = api.call("POST", f"/v1/models/{MODEL}/predict", data=arrow_body(np.zeros((5000, 13)),
                        np.zeros((5000, 26), dtype=np.int64)), headers=ARROW)
    assert response.status_code == 413 and "at most 4096" in response.json()["detail"]


def test_unknown_model_is_a_404(api, served):
    good = {"dense": [0.5] * 13, "sparse": list(range(26))}
    response = api.call("POST", "/v1/models/nope/predict", json={"rows": [good]})
    assert response.status_code == 404 and "nope" in response.json()["detail"]
    assert api.call("GET", "/v1/models/nope").status_code == 404
    assert api.call("DELETE", "/v1/models/nope").status_code == 404
    response = api.call("POST", "/v1/models", json={"name": "other", "checkpoint": "/no/such/checkpoint"})
    assert response.status_code == 422 and "meta.json" in response.json()["detail"]
    response = api.call("POST", "/v1/models", json={"name": "Bad Name", "checkpoint": "/x"})
    assert response.status_code == 422 and "body.name" in response.json()["detail"]


def roll_out_under_traffic(api, checkpoint: str, dense, sparse):
    """Roll MODEL out to `checkpoint` while two clients keep predicting, one through the control plane, one at a
    replica's own ingress that re-reads GET /v1/models/NAME's endpoints when its replica refuses the connection:
    (the deploy reply, every predict status of both)."""
    statuses, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            statuses.append(predict(api, dense, sparse).status_code)

    def direct_traffic():
        target = replica(api)
        while not stop.is_set():
            try:
                statuses.append(predict(target, dense, sparse).status_code)
            except requests.ConnectionError:  # its replica stopped after its drain: the new ones are listed
                target = HttpEndpoint(api.call("GET", f"/v1/models/{MODEL}").json()["endpoints"][0])

    senders = [threading.Thread(target=traffic), threading.Thread(target=direct_traffic)]
    for sender in senders:
        sender.start()
    try:
        response = api.call("POST", "/v1/models", json={"name": MODEL, "checkpoint": checkpoint, "servers": 2})
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    return response, statuses


def test_rollout_to_another_checkpoint_fails_no_request(api, served, checkpoints, synth_data):
    dense, sparse = eval_rows(synth_data, 8)
    before = replica(api).url
    response, statuses = roll_out_under_traffic(api, checkpoints[10], dense, sparse)
    assert response.status_code == 200, response.text
    assert response.json()["step"] == 10
    assert len(statuses) > 5 and set(statuses) == {200}, statuses
    scores = np.array(predict(api, dense, sparse).json()["scores"])
    np.testing.assert_allclose(scores, offline_scores(checkpoints[10], dense, sparse), atol=1e-5, rtol=0)
    after = replica(api)  # the old replica left the endpoints
    assert after.url != before and np.array(predict(after, dense, sparse).json()["scores"]).tolist() == scores.tolist()
    live = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if actor["namespace"] == NAMESPACE}
    assert live == set(server_names(MODEL, open_checkpoint(checkpoints[10]), 2))  # the old servers are gone


def test_terarec_deploy_cli(api, served, checkpoints, synth_data):
    command = [sys.executable, "-m", "terarec.platform.cli", "deploy"]
    failed = subprocess.run(command + ["/no/such/checkpoint", "--name", "cli"], capture_output=True, text=True, env=api.env)
    assert failed.returncode == 2 and failed.stderr.strip().startswith("terarec deploy: error:"), failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    done = subprocess.run(command + [checkpoints[20], "--name", "cli", "--servers", "1"], capture_output=True, text=True,
                          env=api.env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.split("[terarec] serving: ", 1)[1])["step"] == 20
    dense, sparse = eval_rows(synth_data, 4)
    response = predict(api, dense, sparse, model="cli")
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["scores"]), offline_scores(checkpoints[20], dense, sparse), atol=1e-5)
    listed = {model["name"]: model for model in api.call("GET", "/v1/models").json()["models"]}
    assert listed["cli"]["servers"] == 1 and listed[MODEL]["replicas"] == 1


NEW_IDS = np.array([10**15 + 11, 10**15 + 12, 10**15 + 13])  # C1 values no row of the synthetic data has


def with_new_ids(data: str, out) -> str:
    """A copy of `data` whose C1 column holds only NEW_IDS: the new traffic of an online-learning loop."""
    for split in ("train", "eval"):
        (out / split).mkdir(parents=True)
        for path in glob.glob(f"{data}/{split}/*.parquet"):
            table = pq.read_table(path)
            ids = NEW_IDS[np.arange(table.num_rows) % len(NEW_IDS)]
            table = table.set_column(table.schema.get_field_index("C1"), "C1", pa.array(ids, table.schema.field("C1").type))
            pq.write_table(table, out / split / os.path.basename(path))
    shutil.copy(os.path.join(data, "meta.json"), out / "meta.json")
    return str(out)


def test_resume_on_new_ids_then_redeploy_serves_their_trained_rows(api, served, checkpoints, synth_data, tiny_job,
                                                                   tmp_path):
    """The online-learning loop: `terarec train --resume` on data with new IDs, then a rollout under traffic.

    Training runs while the models are served: the cluster's 4 CPUs hold the served replicas, one job worker and
    a rollout's extra replica, so this test rolls `ctr` rather than deploying one more model."""
    new_data = with_new_ids(synth_data, tmp_path / "new-data")
    dense, sparse = eval_rows(new_data, 6)
    assert api.call("POST", "/v1/models", json={"name": MODEL, "checkpoint": checkpoints[20], "servers": 2}).status_code == 200
    before = np.array(predict(api, dense, sparse).json()["scores"])
    np.testing.assert_allclose(before, offline_scores(checkpoints[20], dense, sparse), atol=1e-5, rtol=0)

    config = tiny_job(new_data, steps=30, checkpoint_every=10)["config"]
    trained = subprocess.run([sys.executable, "-m", "terarec.platform.cli", "train", "--config-json", json.dumps(config),
                              "--run-dir", str(tmp_path / "resumed"), "--resume", checkpoints[20]],
                             capture_output=True, text=True, env=api.env, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    resumed = find_checkpoints(str(tmp_path / "resumed"))[30]
    new_keys = feature_keys(torch.from_numpy(sparse))[:, 0].unique()  # C1 is feature 0
    assert open_checkpoint(checkpoints[20]).load_rows().encoder.find(new_keys).eq(-1).all()  # served as zero rows
    assert open_checkpoint(resumed).load_rows().encoder.find(new_keys).ge(0).all()  # trained rows now

    response, statuses = roll_out_under_traffic(api, resumed, dense, sparse)
    assert response.status_code == 200 and response.json()["step"] == 30, response.text
    assert len(statuses) > 3 and set(statuses) == {200}, statuses
    after = np.array(predict(api, dense, sparse).json()["scores"])
    np.testing.assert_allclose(after, offline_scores(resumed, dense, sparse), atol=1e-5, rtol=0)
    assert np.abs(after - before).max() > 1e-3


def test_a_deploy_the_cluster_cannot_hold_fails_in_one_line_and_leaves_what_served(api, served, synth_data,
                                                                                   checkpoints):
    """Never placeable: 422 at once. Not placeable now (the free CPUs held, but the servers' 0.2): `terarec deploy`
    of a new name says what it waits for, gives up at --timeout with exit 2 and leaves nothing; a REST rollout
    gives up with 503 and the previous version serves on."""
    huge = api.call("POST", "/v1/models", json={"name": "huge", "checkpoint": checkpoints[20], "servers": 2,
                                                     "serving": {"cpus": 64}})
    assert huge.status_code == 422, huge.text
    assert huge.json()["detail"] == ("model huge can never be placed on this cluster: replicas=1 needs 64 CPU x 1 + "
                                     "servers=2 needs 0.1 CPU x 2 = 64.2 CPUs; the cluster has 4: lower replicas or "
                                     "serving.cpus")
    before = api.call("GET", f"/v1/models/{MODEL}").json()
    dense, sparse = eval_rows(synth_data, 4)
    hold = ray.util.placement_group([{"CPU": round(ray.available_resources()["CPU"] - 0.2, 4)}])
    ray.get(hold.ready(), timeout=60)
    try:
        late = subprocess.run([sys.executable, "-m", "terarec.platform.cli", "deploy", checkpoints[10], "--name", "late",
                               "--servers", "2", "--timeout", "3"], capture_output=True, text=True, env=api.env, timeout=120)
        assert late.returncode == 2, late.stdout + late.stderr
        line = late.stderr.strip().splitlines()[-1]  # the lines before it are Ray's own log
        assert "Traceback" not in late.stderr, late.stderr
        assert line.startswith("terarec deploy: error: model late: gave up after 3 s pending (replicas=1 needs 1 CPU x 1 "
                               "+ servers=2 needs 0.1 CPU x 2 = 1.2 CPUs; 0.2 free of the cluster's 4): free resources"), line
        assert line.endswith("free of the cluster's 4): free resources (other models, jobs), lower replicas or "
                             "serving.cpus, or wait longer (serving.deploy_timeout_s, terarec deploy --timeout)"), line
        assert "[terarec] deploy late pending: replicas=1 needs 1 CPU" in late.stdout, late.stdout
        assert "late" not in {model["name"] for model in api.call("GET", "/v1/models").json()["models"]}
        assert not [actor for actor in ray.util.list_named_actors(all_namespaces=True) if ":late:" in actor["name"]]

        rollout = api.call("POST", "/v1/models", json={"name": MODEL, "checkpoint": checkpoints[10], "servers": 2,
                                                       "serving": {"deploy_timeout_s": 2}})
        assert rollout.status_code == 503 and "gave up after 2 s pending" in rollout.json()["detail"], rollout.text
        served_now = api.call("GET", f"/v1/models/{MODEL}").json()
        assert (served_now["checkpoint"], served_now["step"]) == (before["checkpoint"], before["step"]), served_now
        response = predict(api, dense, sparse)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.array(response.json()["scores"]), offline_scores(before["checkpoint"], dense, sparse),
                                   atol=1e-5, rtol=0)
        live = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if actor["namespace"] == NAMESPACE}
        assert not live & set(server_names(MODEL, open_checkpoint(checkpoints[10]), 2))  # its new servers stopped
    finally:
        ray.util.remove_placement_group(hold)


@pytest.mark.gpu
def test_gpu_replica_and_servers_score_as_the_offline_model(api, checkpoints, synth_data):
    """On a GPU cluster: the dense model on the replica's GPU, the servers' tiered stores on theirs."""
    body = {"name": "gpu", "checkpoint": checkpoints[20], "servers": 2, "server_gpus": 0.25, "serving": {"gpus": 0.5},
            "store": {"kind": "cached_host", "cache_bytes": 1e6}}
    response = api.call("POST", "/v1/models", json=body)
    assert response.status_code == 200 and response.json()["device"] == "cuda", response.text
    dense, sparse = eval_rows(synth_data, 300)
    scores = np.array(predict(api, dense, sparse, model="gpu").json()["scores"])
    np.testing.assert_allclose(scores, offline_scores(checkpoints[20], dense, sparse), atol=1e-4, rtol=0)
    assert api.call("DELETE", "/v1/models/gpu").status_code == 204
