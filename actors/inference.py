"""Online inference: a Ray Serve deployment that scores raw Criteo rows with a trained checkpoint.

The replica builds the same dense model as training (`model_from_checkpoint`), in eval mode, over a
read-only row backend that asks the embedding servers (`embedding_server.py`) for the rows; `@serve.batch`
merges concurrent requests into one forward (its size and wait are `ServingConfig`), on the replica's GPU
when it has one; recent rows stay in a replica-local cache (`RecentRows`) for a bounded time. `deploy_model` (used by `POST /v1/models` and
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
from terarec.core.config import ServingConfig, StoreConfig

from .embedding_server import RecentRows, ServerRows, server_handles, start_servers, stop_servers


def model_from_checkpoint(checkpoint: CheckpointContents, backend) -> nn.Module:
    """The checkpoint's dense model (eval mode) around an Embedding front reading `backend`; built as training builds it."""
    model = model_from_config(checkpoint.config, backend, num_tasks=len(checkpoint.meta["label_columns"]))
    model.load_state_dict(checkpoint.dense_state["model"])
    return model.eval()


@torch.inference_mode()
def score(model: nn.Module, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """dense [B, 13] float32 (log-transformed), sparse [B, 26] int64 raw IDs -> [B, T] click probabilities (CPU)."""
    device = next(model.parameters()).device
    dense, sparse = dense.to(device), sparse.to(device)
    logits = model(Batch(dense, sparse, torch.zeros((dense.shape[0], 1), device=device)))  # labels unused by forward
    return torch.sigmoid(logits.reshape(dense.shape[0], -1).float()).cpu()


def rows_in(requests: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """A batch's size for @serve.batch: its rows (a forward's cost), not its requests."""
    return sum(len(dense) for dense, _ in requests)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128, graceful_shutdown_timeout_s=30,
                  max_surge_percent=25)  # a rollout starts replacements before it stops old replicas
class InferenceModel:
    """One replica: the dense model of a checkpoint; embedding rows come from the named servers."""

    def __init__(self, checkpoint_dir: str, servers: list[str], settings: dict | None = None):
        settings = ServingConfig.model_validate(settings or {})
        checkpoint = open_checkpoint(checkpoint_dir)
        dim = store_width(checkpoint.config)
        recent = RecentRows(dim, settings.recent_rows, settings.recent_max_age_s) if settings.recent_rows else None
        self.rows = ServerRows(server_handles(servers), checkpoint.meta["num_buckets"], dim, recent)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows a replica a GPU only if it asked for one
        self.model = model_from_checkpoint(checkpoint, self.rows).to(device)
        self.predict.set_max_batch_size(settings.max_batch_rows)
        self.predict.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.info = {"checkpoint": checkpoint_dir, "step": checkpoint.step, "model": checkpoint.config.model,
                     "tasks": list(checkpoint.meta["label_columns"]), "servers": len(servers), "device": device}

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.0, batch_size_fn=rows_in)  # __init__ applies ServingConfig
    async def predict(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Each request is (dense [n, 13] float32 transformed, sparse [n, 26] int64); answers [n, T] probabilities."""
        sizes = [len(dense) for dense, _ in requests]
        dense = torch.from_numpy(np.concatenate([d for d, _ in requests]).astype(np.float32, copy=False))
        sparse = torch.from_numpy(np.concatenate([s for _, s in requests]).astype(np.int64, copy=False))
        scores = await asyncio.to_thread(score, self.model, dense, sparse)
        return list(np.split(scores.numpy(), np.cumsum(sizes)[:-1]))

    def describe(self) -> dict:
        recent = self.rows.recent
        hit_rate = recent.hits / recent.lookups if recent and recent.lookups else None
        return self.info | {"recent_hit_rate": hit_rate}


def deploy_model(name: str, checkpoint_dir: str, replicas: int = 1, num_servers: int | None = None,
                 replica_cpus: float = 1.0, store: StoreConfig | None = None, server_gpus: float = 0,
                 settings: ServingConfig | None = None) -> dict:
    """Start (or roll out) the Serve application `name` for a checkpoint; returns what is served.

    `store`: the servers' store (default: all rows in memory); `server_gpus`: GPUs per server (its store on
    the GPU); `settings`: the replicas' batching, cache and GPUs. Needs a Ray connection (`ray.init`) to a
    cluster that outlives the caller. Waits until the new replicas run, then stops the embedding servers of
    the checkpoint they replaced.
    """
    settings = settings or ServingConfig()
    checkpoint = open_checkpoint(checkpoint_dir)
    num_servers = num_servers or checkpoint.meta["world_size"]
    servers = start_servers(name, checkpoint, num_servers, store, num_gpus=server_gpus)
    serve.start(proxy_location="Disabled")  # served through the control plane's handles; no open HTTP port
    options = {"num_cpus": replica_cpus, "num_gpus": settings.gpus}
    app = InferenceModel.options(num_replicas=replicas, ray_actor_options=options).bind(
        os.path.abspath(checkpoint.directory), servers, settings.model_dump())
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
