"""/v1/models: checkpoints served by Ray Serve (deploy, roll out, list, delete) and the predict route."""
from __future__ import annotations

import threading

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from terarec.core.checkpoints import CheckpointNotFound, find_checkpoint
from terarec.core.data.schema import transform_dense
from terarec.core.errors import CheckpointError

from ..auth import require_token
from ..schemas import ModelList, ModelRequest, ModelView, PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_token)])


class ServedModels:
    """The control plane's view of Ray Serve: deploys through `deploy_model`, keeps one handle per model."""

    def __init__(self, ray):
        self.ray = ray
        self._handles: dict = {}
        self._lock = threading.Lock()

    def serve(self):
        self.ray.connect_driver()
        from terarec.actors import inference

        return inference

    def deploy(self, body: ModelRequest) -> None:
        try:
            self.serve().deploy_model(body.name, body.checkpoint, body.replicas, body.servers)
        except (CheckpointError, FileNotFoundError) as error:
            raise HTTPException(status_code=422, detail=f"checkpoint {body.checkpoint!r}: {error}") from None
        with self._lock:
            self._handles.pop(body.name, None)

    def status(self) -> dict[str, dict]:
        return self.serve().served_models()

    def view(self, name: str, status: dict) -> ModelView:
        info = {}
        if status["replicas"]:
            info = self.handle(name).describe.remote().result(timeout_s=30)
        return ModelView(name=name, **status, **info)

    def handle(self, name: str):
        """The app's handle; 404 when Serve runs no such model."""
        with self._lock:
            handle = self._handles.get(name)
        if handle is None:
            if name not in self.status():
                raise HTTPException(status_code=404, detail=f"no model {name!r} is deployed (POST /v1/models deploys one)")
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


def job_checkpoint(body: ModelRequest, records) -> ModelRequest:
    """`best` / `latest` name a checkpoint of the training job `job`; a directory stays as it is."""
    if body.checkpoint not in ("best", "latest"):
        return body
    if body.job is None:
        raise HTTPException(status_code=422, detail=f"checkpoint {body.checkpoint!r} needs `job`: the id of the "
                                                    f"training job whose checkpoint to serve")
    record = records.job(body.job)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no job {body.job!r}")
    try:
        return body.model_copy(update={"checkpoint": find_checkpoint(record.run_dir, body.checkpoint)})
    except CheckpointNotFound as error:
        raise HTTPException(status_code=422, detail=f"job {body.job}: {error}") from None


@router.post("", response_model=ModelView, summary="deploy a checkpoint (an existing name rolls out the new one)")
def deploy_model(body: ModelRequest, request: Request) -> ModelView:
    models: ServedModels = request.app.state.models
    body = job_checkpoint(body, request.app.state.records)
    models.deploy(body)
    return models.view(body.name, models.status()[body.name])


@router.get("", response_model=ModelList, summary="the deployed models")
def list_models(request: Request) -> ModelList:
    models: ServedModels = request.app.state.models
    return ModelList(models=[models.view(name, status) for name, status in sorted(models.status().items())])


@router.get("/{name}", response_model=ModelView, summary="one model: Serve status and what it serves")
def get_model(name: str, request: Request) -> ModelView:
    models: ServedModels = request.app.state.models
    status = models.status().get(name)
    if status is None:
        raise HTTPException(status_code=404, detail=f"no model {name!r} is deployed")
    return models.view(name, status)


@router.delete("/{name}", status_code=204, summary="stop serving a model (its replicas and embedding servers)")
def delete_model(name: str, request: Request) -> None:
    request.app.state.models.delete(name)


@router.post("/{name}/predict", response_model=PredictResponse, summary="click probabilities of raw Criteo rows")
async def predict(name: str, body: PredictRequest, request: Request) -> PredictResponse:
    state = request.app.state
    if len(body.rows) > state.settings.max_predict_rows:
        raise HTTPException(status_code=413, detail=f"{len(body.rows)} rows in one request; at most "
                                                    f"{state.settings.max_predict_rows} (TERAREC_MAX_PREDICT_ROWS)")
    handle = await run_in_threadpool(state.models.handle, name)
    dense = np.asarray([row.dense for row in body.rows], dtype=np.float64)
    dense = dense.astype(np.float32) if body.transformed else transform_dense(dense)
    sparse = np.asarray([row.sparse for row in body.rows], dtype=np.int64)
    scores = await handle.predict.remote((dense, sparse))
    state.telemetry.predicted_rows.labels(name).inc(len(body.rows))
    return PredictResponse(model=name, scores=scores.tolist())
