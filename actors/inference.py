"""Online inference: a Ray Serve deployment that scores raw Criteo rows with a trained checkpoint.

The replica builds the same dense model as training (`model_from_checkpoint`), in eval mode, over a
read-only row backend that asks the embedding servers (`embedding_server.py`) for the rows; `@serve.batch`
merges concurrent requests into one forward (its size and wait are `ServingConfig`), on the replica's GPU
when it has one; recent rows stay in a replica-local cache (`RecentRows`) for a bounded time. `deploy_model` (used by `POST /v1/models` and
`terarec deploy`) starts the servers and runs the Serve application, waiting at most
`serving.deploy_timeout_s` for their resources; deploying a new checkpoint under the same name is Serve's
rolling update (new replicas, with their own servers, take over before the old ones and their servers are
stopped), so no request fails.

A replica also answers predictions over HTTP itself when the deploy hands it an ingress (the control plane's
`api/replica_ingress.py`: the app, its token check included): on a port of its node, listed by `model_endpoints`,
requests skip the control plane and Serve's handle call. A stopping replica leaves that list at once and keeps
answering for `serving.drain_s`, so that clients can move to the new replicas' endpoints.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import numpy as np
import torch
from ray import serve
from torch import nn

from terarec.models import Batch
from terarec.core.build import model_from_config, store_width
from terarec.core.checkpoints import CheckpointContents, open_checkpoint
from terarec.core.config import ServingConfig, StoreConfig
from terarec.core.resources import NOTICE_AFTER_S, ResourceError, largest, pending_text, short_of, unfit_text
from terarec.store import feature_keys

from .embedding_server import (SERVER_CPUS, RecentRows, ServerRows, model_servers, server_handles, server_names,
                               start_servers, stop_servers)
from .serve_env import SERVE_ENV


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


INLINE_ROWS = 256  # a forward of at most this many rows may run on the replica's event loop (~1 ms on a CPU)


def rows_in(requests: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """A batch's size for @serve.batch: its rows (a forward's cost), not its requests."""
    return sum(len(dense) for dense, _ in requests)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128, graceful_shutdown_timeout_s=30,
                  max_surge_percent=25)  # a rollout starts replacements before it stops old replicas
class InferenceModel:
    """One replica: the dense model of a checkpoint; embedding rows come from the named servers.

    `spec` (deploy_model's): checkpoint, servers (their names), settings (a ServingConfig), replicas, server_gpus;
    a replica hands it back (`spec()`) so a failed rollout can put it back."""

    def __init__(self, spec: dict):
        self._spec = spec
        self.settings = settings = ServingConfig.model_validate(spec["settings"])
        checkpoint = open_checkpoint(spec["checkpoint"])
        dim = store_width(checkpoint.config)
        recent = RecentRows(dim, settings.recent_rows, settings.recent_max_age_s) if settings.recent_rows else None
        self.rows = ServerRows(server_handles(spec["servers"]), checkpoint.meta["num_buckets"], dim, recent)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows a replica a GPU only if it asked for one
        self.model = model_from_checkpoint(checkpoint, self.rows).to(device)
        self.rows.warm()  # before the replica serves: a rollout's new replicas take over with a full cache
        self.predict.set_max_batch_size(settings.max_batch_rows)
        self.predict.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.info = {"checkpoint": spec["checkpoint"], "step": checkpoint.step, "model": checkpoint.config.model,
                     "tasks": list(checkpoint.meta["label_columns"]), "servers": len(spec["servers"]), "device": device}
        self.forwards = self.forward_rows = 0
        self.ingress = None
        if spec.get("ingress") is not None and settings.direct_ingress:
            app = spec["ingress"].app(spec["name"], lambda dense, sparse: self.predict((dense, sparse)))
            self.ingress = ReplicaIngressServer(spec["name"], app, spec["ingress"].server_options())

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.0, batch_size_fn=rows_in)  # __init__ applies ServingConfig
    async def predict(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Each request is (dense [n, 13] float32 transformed, sparse [n, 26] int64); answers [n, T] probabilities."""
        sizes = [len(dense) for dense, _ in requests]
        dense = torch.from_numpy(np.concatenate([d for d, _ in requests]).astype(np.float32, copy=False))
        sparse = torch.from_numpy(np.concatenate([s for _, s in requests]).astype(np.int64, copy=False))
        # a small batch's rows, which the forward's Embedding front will look up, fetched here without holding the
        # event loop; then, if they were all cached, its forward runs on the loop: shorter than the hop to a worker
        # thread and back. A large batch's forward runs in a thread, which asks the servers for what is not cached.
        if len(dense) <= INLINE_ROWS and await self.rows.fetch(torch.unique(feature_keys(sparse))):
            scores = score(self.model, dense, sparse)
        else:
            scores = await asyncio.to_thread(score, self.model, dense, sparse)
        self.rows.renew_when_due()
        self.forwards, self.forward_rows = self.forwards + 1, self.forward_rows + len(dense)
        return list(np.split(scores.numpy(), np.cumsum(sizes)[:-1]))

    def describe(self) -> dict:
        """What the replica serves, its row cache, and its forwards so far (how well @serve.batch merges requests)."""
        recent = self.rows.recent
        counts = {"forwards": self.forwards, "forward_rows": self.forward_rows}
        if recent is None:
            return self.info | counts | {"recent_hit_rate": None, "recent_rows": None}
        return self.info | counts | {"recent_hit_rate": recent.hits / recent.lookups if recent.lookups else None,
                                     "recent_rows": len(recent)}

    def spec(self) -> dict:
        return self._spec

    async def __del__(self):
        """Serve's graceful shutdown (a delete, a rollout's old replica): the replica's endpoint stops being listed,
        answers for `drain_s` more, then closes once its requests are answered."""
        if self.ingress is not None:
            await self.ingress.stop(self.settings.drain_s)


ENDPOINT_PREFIX = "terarec-endpoint:"  # Ray's internal KV: ENDPOINT_PREFIX + model + ":" + replica actor -> URL
SERVE_NAMESPACE = "serve"  # where Serve's replica actors are named


class ReplicaIngressServer:
    """uvicorn serving `app` on this replica's event loop, on a free port of the node's address, listed in Ray's
    internal KV under the model's name while it runs."""

    def __init__(self, model: str, app, options: dict):
        import ray
        import uvicorn
        from ray.experimental.internal_kv import _internal_kv_put

        host = ray.util.get_node_ip_address()
        listener = socket.create_server((host, 0), backlog=2048)
        listener.setblocking(False)
        self.url = f"http://{host}:{listener.getsockname()[1]}"
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30, **options)
        self.server = uvicorn.Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[listener]))
        self.key = f"{ENDPOINT_PREFIX}{model}:{serve.get_replica_context().replica_id.to_full_id_str()}"
        _internal_kv_put(self.key, self.url)

    async def stop(self, drain_s: float) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.key)
        await asyncio.sleep(drain_s)
        self.server.should_exit = True
        await self.task


def model_endpoints(name: str) -> list[str]:
    """The URLs of the running replicas of model `name` that answer predictions themselves (sorted)."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    live = {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == SERVE_NAMESPACE}
    prefix = f"{ENDPOINT_PREFIX}{name}:"
    urls = []
    for key in _internal_kv_list(prefix):
        if key.decode()[len(prefix):] in live:  # a replica that died without its __del__ left its key behind
            url = _internal_kv_get(key)
            urls += [url.decode()] if url else []
    return sorted(urls)


class DeployTimeout(ResourceError):
    """A deploy waited serving.deploy_timeout_s for its replicas or servers; what served before serves on."""


POLL_S = 0.5
REMEDY = {"CPU": "lower replicas or serving.cpus", "GPU": "lower replicas, serving.gpus or server_gpus"}


def deploy_asks(spec: dict) -> list[tuple[str, int, dict[str, float]]]:
    """What a deploy's replicas and servers ask of the cluster, as core/resources.py weighs it."""
    settings = ServingConfig.model_validate(spec["settings"])
    return [(f"replicas={spec['replicas']}", spec["replicas"], {"CPU": settings.cpus, "GPU": settings.gpus}),
            (f"servers={len(spec['servers'])}", len(spec["servers"]), {"CPU": SERVER_CPUS, "GPU": spec["server_gpus"]})]


class DeployWait:
    """A deploy's clock: `until(done)` polls until done() or deploy_timeout_s; after NOTICE_AFTER_S (or half the
    deadline, if shorter) it says once (through `say`) what the deploy waits for, and on giving up raises
    DeployTimeout, one line naming the resource short when the deploy began and the remedy."""

    def __init__(self, name: str, spec: dict, say: Callable[[str], None]):
        import ray

        self.name, self.asks, self.say = name, deploy_asks(spec), say
        self.timeout_s = ServingConfig.model_validate(spec["settings"]).deploy_timeout_s
        self.started, self.said = time.monotonic(), False
        # what was free before the deploy placed anything: its own placed actors do not count as short later
        self.free, self.cluster = ray.available_resources(), ray.cluster_resources()

    def reason(self) -> tuple[str, str]:
        """What the deploy waits for, in one line, and the resource short (CPU when none was)."""
        short = short_of(self.asks, self.free)
        placing = " and ".join(who for who, _, _ in self.asks)
        return pending_text(short, self.cluster, placing), short[0] if short else "CPU"

    def until(self, done: Callable[[], bool]) -> None:
        while not done():
            waited = time.monotonic() - self.started
            if waited >= self.timeout_s:
                reason, resource = self.reason()
                raise DeployTimeout(f"model {self.name}: gave up after {self.timeout_s:g} s pending ({reason}): free "
                                    f"resources (other models, jobs), {REMEDY[resource]}, or wait longer "
                                    f"(serving.deploy_timeout_s, terarec deploy --timeout)")
            if waited >= min(NOTICE_AFTER_S, self.timeout_s / 2) and not self.said:
                self.say(f"[terarec] deploy {self.name} pending: {self.reason()[0]}; giving up after "
                         f"{self.timeout_s:g} s")
                self.said = True
            time.sleep(POLL_S)


def deploy_model(name: str, checkpoint_dir: str, replicas: int = 1, num_servers: int | None = None,
                 store: StoreConfig | None = None, server_gpus: float = 0, settings: ServingConfig | None = None,
                 say: Callable[[str], None] = print, ingress=None) -> dict:
    """Start (or roll out) the Serve application `name` for a checkpoint; returns what is served.

    `store`: the servers' store (default: all rows in memory); `server_gpus`: GPUs per server (its store on
    the GPU); `settings`: the replicas' batching, cache, resources and the deploy's deadline; `ingress`: what makes
    each replica's own predict app (`app(name, scorer)`, `server_options()`: api/replica_ingress.py), if any. Needs a Ray
    connection (`ray.init`) to a cluster that outlives the caller. A deploy the cluster can never hold fails at
    once (ResourceError); one that waits says why through `say` and gives up after settings.deploy_timeout_s
    (DeployTimeout), leaving what served before: its own new servers stopped, a new name deleted, a rollout's
    previous version put back. Once the new replicas run, the servers of the checkpoint they replaced stop.
    """
    import ray

    settings = settings or ServingConfig()
    checkpoint = open_checkpoint(checkpoint_dir)
    num_servers = num_servers or checkpoint.meta["world_size"]
    spec = {"name": name, "checkpoint": os.path.abspath(checkpoint.directory),
            "servers": server_names(name, checkpoint, num_servers), "settings": settings.model_dump(),
            "replicas": replicas, "server_gpus": server_gpus, "ingress": ingress}
    short = short_of(deploy_asks(spec), largest(ray.cluster_resources(), cluster_capacity()))
    if short:
        raise ResourceError(f"model {name} can never be placed on this cluster: {unfit_text(short, REMEDY[short[0]])}")
    serve.start(proxy_location="Disabled")  # served through the control plane's handles; no open HTTP port
    previous, servers_before = running_spec(name), model_servers(name)
    wait = DeployWait(name, spec, say)
    started = False
    try:
        _, loading = start_servers(name, checkpoint, num_servers, store, num_gpus=server_gpus)
        wait.until(lambda: len(ray.wait(loading, num_returns=len(loading), timeout=0)[0]) == len(loading))
        ray.get(loading)  # a server that failed to load raises here
        run_application(name, spec)
        started = True
        wait.until(lambda: application_running(name))
    except BaseException:
        if started and previous:  # its replicas still serve (a rollout starts new ones first): target them again
            run_application(name, previous)
        elif started:
            serve.delete(name)
        stop_servers(name, keep=servers_before)
        raise
    stop_servers(name, keep=spec["servers"])
    return {"name": name, "checkpoint": spec["checkpoint"], "step": checkpoint.step, "replicas": replicas,
            "servers": num_servers}


def run_application(name: str, spec: dict) -> None:
    """Hand Serve the application of `spec` (a rollout if `name` runs); returns without waiting for it to run."""
    settings = ServingConfig.model_validate(spec["settings"])
    options = {"num_cpus": settings.cpus, "num_gpus": settings.gpus, "runtime_env": {"env_vars": SERVE_ENV}}
    app = InferenceModel.options(num_replicas=spec["replicas"], ray_actor_options=options).bind(spec)
    serve.run_many([serve.RunTarget(target=app, name=name, route_prefix=None)], wait_for_applications_running=False)


def application_running(name: str) -> bool:
    """Whether every replica of the application's target runs; raises if Serve gave up on it (a replica's
    constructor failed)."""
    app = serve.status().applications.get(name)
    status = _text(app.status) if app else "NOT_STARTED"
    if status == "DEPLOY_FAILED":
        raise RuntimeError(f"deploying model {name} failed: {app.message}")
    return status == "RUNNING"


def running_spec(name: str) -> dict | None:
    """The spec the application `name` serves, when it runs replicas; None for a new name."""
    if served_models().get(name, {}).get("replicas", 0) == 0:
        return None
    return serve.get_app_handle(name).spec.remote().result(timeout_s=30)


def cluster_capacity() -> dict[str, float]:
    """What an autoscaling cluster may grow to (empty for a fixed one)."""
    from ray._private.state import state as ray_state

    return ray_state.get_max_resources_from_cluster_config() or {}


def delete_model(name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    serve.delete(name)
    stop_servers(name)
    _internal_kv_del(f"{ENDPOINT_PREFIX}{name}:", del_by_prefix=True)  # keys of replicas that died unstopped


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
