"""Online inference: a Ray Serve deployment that scores raw Criteo rows with a trained checkpoint.

The replica builds the same dense model as training (`model_from_checkpoint`), in eval mode, over a
read-only row backend that asks the embedding servers (`embedding_server.py`) for the rows; `@serve.batch`
merges concurrent requests into one forward. `deploy_model` (used by `POST /v1/models` and
`terarec deploy`) starts the servers and runs the Serve application; deploying a new checkpoint under the
same name is Serve's rolling update (new replicas, with their own servers, take over before the old ones
and their servers are stopped), so no request fails.
"""
from __future__ import annotations

import asyncio
import os

import numpy as np
import torch
from ray import serve
from torch import nn

from terarec.models import Batch
from terarec.core.build import model_from_config, store_width
from terarec.core.checkpoints import CheckpointContents, open_checkpoint

from .embedding_server import ServerRows, server_handles, start_servers, stop_servers



def model_from_checkpoint(checkpoint: CheckpointContents, backend) -> nn.Module:
    """The checkpoint's dense model (eval mode) around an Embedding front reading `backend`; built as training builds it."""
    model = model_from_config(checkpoint.config, backend, num_tasks=len(checkpoint.meta["label_columns"]))
    model.load_state_dict(checkpoint.dense_state["model"])
    return model.eval()


@torch.inference_mode()
def score(model: nn.Module, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """dense [B, 13] float32 (log-transformed), sparse [B, 26] int64 raw IDs -> [B, T] click probabilities."""
    logits = model(Batch(dense, sparse, torch.zeros((dense.shape[0], 1))))  # labels unused by forward
    return torch.sigmoid(logits.reshape(dense.shape[0], -1).float())


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128, graceful_shutdown_timeout_s=30,
                  max_surge_percent=25)  # a rollout starts replacements before it stops old replicas
class InferenceModel:
    """One replica: the dense model of a checkpoint; embedding rows come from the named servers."""

    def __init__(self, checkpoint_dir: str, servers: list[str]):
        checkpoint = open_checkpoint(checkpoint_dir)
        backend = ServerRows(server_handles(servers), checkpoint.meta["num_buckets"], store_width(checkpoint.config))
        self.model = model_from_checkpoint(checkpoint, backend)
        self.info = {"checkpoint": checkpoint_dir, "step": checkpoint.step, "model": checkpoint.config.model,
                     "tasks": list(checkpoint.meta["label_columns"]), "servers": len(servers)}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def predict(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Each request is (dense [n, 13] float32 transformed, sparse [n, 26] int64); answers [n, T] probabilities."""
        sizes = [len(dense) for dense, _ in requests]
        dense = torch.from_numpy(np.concatenate([d for d, _ in requests]).astype(np.float32, copy=False))
        sparse = torch.from_numpy(np.concatenate([s for _, s in requests]).astype(np.int64, copy=False))
        scores = await asyncio.to_thread(score, self.model, dense, sparse)
        return list(np.split(scores.numpy(), np.cumsum(sizes)[:-1]))

    def describe(self) -> dict:
        return self.info


def deploy_model(name: str, checkpoint_dir: str, replicas: int = 1, num_servers: int | None = None,
                 replica_cpus: float = 1.0) -> dict:
    """Start (or roll out) the Serve application `name` for a checkpoint; returns what is served.

    Needs a Ray connection (`ray.init`) to a cluster that outlives the caller. Waits until the new
    replicas run, then stops the embedding servers of the checkpoint they replaced.
    """
    checkpoint = open_checkpoint(checkpoint_dir)
    num_servers = num_servers or checkpoint.meta["world_size"]
    servers = start_servers(name, checkpoint, num_servers)
    serve.start(proxy_location="Disabled")  # served through the control plane's handles; no open HTTP port
    app = InferenceModel.options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus}).bind(
        os.path.abspath(checkpoint.directory), servers)
    serve.run(app, name=name, route_prefix=None)
    stop_servers(name, keep=servers)
    return {"name": name, "checkpoint": os.path.abspath(checkpoint.directory), "step": checkpoint.step,
            "replicas": replicas, "servers": num_servers}


def delete_model(name: str) -> None:
    serve.delete(name)
    stop_servers(name)


def served_models() -> dict[str, dict]:
    """The Serve applications that run an InferenceModel: name -> status, message, running replicas."""
    models = {}
    for name, app in serve.status().applications.items():
        deployment = app.deployments.get(InferenceModel.name)
        if deployment is None:
            continue
        models[name] = {"status": _text(app.status), "message": app.message or None,
                        "replicas": int(deployment.replica_states.get("RUNNING", 0))}
    return models


def _text(value) -> str:
    return str(getattr(value, "value", value))
