"""Served models: checkpoints deployed on Ray Serve through `actors/inference.py`, one handle kept per model."""
from __future__ import annotations

import logging
import threading

import numpy as np

from terarec.core.resources import ResourceError

from ..errors import NotFound, Unavailable, Unprocessable
from ..job_records import JobRecords
from ..ray_cluster import RayCluster
from ..replica_ingress import ReplicaIngress
from ..schemas import ModelRequest, ModelView
from ..settings import Settings
from ..telemetry import Telemetry

log = logging.getLogger("terarec.api")


class ServedModels:
    def __init__(self, settings: Settings, ray: RayCluster, telemetry: Telemetry, records: JobRecords):
        self.settings, self.ray, self.telemetry, self.records = settings, ray, telemetry, records
        self._handles: dict = {}
        self._lock = threading.Lock()
        self._loop_handles: dict = {}  # made on the event loop; deploy and delete drop a name's (one dict op)

    def serve(self):
        self.ray.connect_driver()
        from terarec.actors import inference

        return inference

    def deploy(self, body: ModelRequest) -> ModelView:
        body = self.job_checkpoint(body)
        check_checkpoint(body.checkpoint)
        inference = self.serve()
        try:
            inference.deploy_model(body.name, body.checkpoint, body.replicas, body.servers, store=body.store,
                                   server_gpus=body.server_gpus, settings=body.serving, say=log.warning,
                                   ingress=ReplicaIngress.of(self.settings))
        except inference.DeployTimeout as error:
            raise Unavailable(str(error)) from None
        except ResourceError as error:  # it can never be placed
            raise Unprocessable(str(error)) from None
        with self._lock:
            self._handles.pop(body.name, None)
        self._loop_handles.pop(body.name, None)
        return self.view(body.name, self.status()[body.name])

    def job_checkpoint(self, body: ModelRequest) -> ModelRequest:
        """`best` / `latest` name a checkpoint of the training job `job`; a directory stays as it is."""
        from terarec.core.checkpoints import CheckpointNotFound, find_checkpoint

        if body.checkpoint not in ("best", "latest"):
            return body
        if body.job is None:
            raise Unprocessable(f"checkpoint {body.checkpoint!r} needs `job`: the id of the training job whose "
                                "checkpoint to serve")
        record = self.records.job(body.job)
        if record is None:
            raise NotFound(f"no job {body.job!r}")
        try:
            return body.model_copy(update={"checkpoint": find_checkpoint(record.run_dir, body.checkpoint)})
        except CheckpointNotFound as error:
            raise Unprocessable(f"job {body.job}: {error}") from None

    def status(self) -> dict[str, dict]:
        return self.serve().served_models()

    def list(self) -> list[ModelView]:
        return [self.view(name, status) for name, status in sorted(self.status().items())]

    def get(self, name: str) -> ModelView:
        status = self.status().get(name)
        if status is None:
            raise NotFound(f"no model {name!r} is deployed")
        return self.view(name, status)

    def view(self, name: str, status: dict) -> ModelView:
        info = {}
        if status["replicas"]:
            info = self.handle(name).describe.remote().result(timeout_s=30)
            info["endpoints"] = self.serve().model_endpoints(name)
        return ModelView(name=name, **status, **info)

    async def predict_handle(self, name: str):
        """The app's handle for predictions, its router on this event loop: a request skips the hops to and from
        Serve's router thread (the handles of `handle()` keep that thread: worker threads call them)."""
        handle = self._loop_handles.get(name)
        if handle is None:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(self.handle, name)  # NotFound for a name Serve does not run
            from ray.serve.handle import DeploymentHandle

            # a handle of its own (get_app_handle's are shared and already started), with Serve's private init option
            handle = DeploymentHandle(self.serve().InferenceModel.name, name)
            handle._init(_run_router_in_separate_loop=False)
            self._loop_handles[name] = handle
        return handle

    def handle(self, name: str):
        """The app's handle; NotFound when Serve runs no such model."""
        with self._lock:
            handle = self._handles.get(name)
        if handle is None:
            if name not in self.status():
                raise NotFound(f"no model {name!r} is deployed (POST /v1/models deploys one)")
            from ray import serve

            handle = serve.get_app_handle(name)
            with self._lock:
                self._handles[name] = handle
        return handle

    def delete(self, name: str) -> None:
        self.handle(name)
        self.serve().delete_model(name)
        with self._lock:
            self._handles.pop(name, None)
        self._loop_handles.pop(name, None)

    async def predict(self, name: str, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """[n, T] click probabilities of the rows (`predict_bodies.model_inputs`: dense [n, 13] transformed, sparse
        [n, 26] raw IDs), through the model's Serve handle."""
        handle = await self.predict_handle(name)
        scores = await handle.predict.remote((dense, sparse))
        self.telemetry.predicted_rows.labels(name).inc(len(dense))
        return scores


def check_checkpoint(directory: str) -> None:
    """Unprocessable unless `directory` opens as a terarec checkpoint; the reply never quotes what the files hold."""
    from terarec.core.checkpoints import open_checkpoint

    try:
        open_checkpoint(directory)
    except Exception:
        log.info("checkpoint %r does not open", directory, exc_info=True)
        raise Unprocessable(f"checkpoint {directory!r} is not a terarec checkpoint: its meta.json or dense.pt is "
                            "missing or not one that terarec wrote") from None
