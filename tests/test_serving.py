"""Online inference over REST: deploy the REST-trained checkpoint on Ray Serve, predict, roll out, clean up.

Served scores must equal the offline model's (the checkpoint loaded in this process) on the same rows.
"""
from __future__ import annotations

import glob
import json
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from terarec.actors.embedding_server import NAMESPACE, server_names
from terarec.actors.inference import model_from_checkpoint, score
from terarec.core.checkpoints import find_checkpoints, open_checkpoint
from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS, transform_dense
from helpers import trained_job

pytestmark = pytest.mark.slow
MODEL = "ctr"


@pytest.fixture(scope="module")
def checkpoints(api, synth_data) -> dict[int, str]:
    return find_checkpoints(trained_job(api, synth_data)["done"]["run_dir"])


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


def server_rows(model: str, checkpoint_dir: str, servers: int) -> list[int]:
    names = server_names(model, open_checkpoint(checkpoint_dir), servers)
    return ray.get([ray.get_actor(name, namespace=NAMESPACE).rows.remote() for name in names])


def test_served_scores_equal_the_offline_model(api, served, checkpoints, synth_data):
    assert served["status"] == "RUNNING" and served["step"] == 20 and served["servers"] == 2
    assert served["tasks"] == ["label"]
    dense, sparse = eval_rows(synth_data, 300)
    response = predict(api, dense, sparse)
    assert response.status_code == 200, response.text
    scores = np.array(response.json()["scores"])
    assert scores.shape == (300, 1)
    np.testing.assert_allclose(scores, offline_scores(checkpoints[20], dense, sparse), atol=1e-5, rtol=0)


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
    response = api.call("POST", f"/v1/models/{MODEL}/predict", json={"rows": [good] * 5000})
    assert response.status_code == 413 and "at most 4096" in response.json()["detail"]
    response = api.call("POST", f"/v1/models/{MODEL}/predict", json={"rows": [good] * 120_000})
    assert response.status_code == 413


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


def test_rollout_to_another_checkpoint_fails_no_request(api, served, checkpoints, synth_data):
    dense, sparse = eval_rows(synth_data, 8)
    statuses, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            statuses.append(predict(api, dense, sparse).status_code)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        response = api.call("POST", "/v1/models", json={"name": MODEL, "checkpoint": checkpoints[10], "servers": 2})
    finally:
        stop.set()
        sender.join()
    assert response.status_code == 200, response.text
    assert response.json()["step"] == 10
    assert len(statuses) > 5 and set(statuses) == {200}, statuses
    scores = np.array(predict(api, dense, sparse).json()["scores"])
    np.testing.assert_allclose(scores, offline_scores(checkpoints[10], dense, sparse), atol=1e-5, rtol=0)
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
