"""/v1/models: checkpoints served by Ray Serve and the predict route (the work is in services/models.py)."""
from __future__ import annotations

from fastapi import APIRouter

from ..auth import bearer_scheme
from ..dependencies import Models
from ..responses import AsciiJSONResponse
from ..schemas import ModelList, ModelRequest, ModelView, PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[bearer_scheme])


@router.post("", response_model=ModelView, summary="deploy a checkpoint (an existing name rolls out the new one)")
def deploy_model(body: ModelRequest, models: Models) -> ModelView:
    return models.deploy(body)


@router.get("", response_model=ModelList, summary="the deployed models")
def list_models(models: Models) -> ModelList:
    return ModelList(models=models.list())


@router.get("/{name}", response_model=ModelView, summary="one model: Serve status and what it serves")
def get_model(name: str, models: Models) -> ModelView:
    return models.get(name)


@router.delete("/{name}", status_code=204, summary="stop serving a model (its replicas and embedding servers)")
def delete_model(name: str, models: Models) -> None:
    models.delete(name)


@router.post("/{name}/predict", response_model=PredictResponse, summary="click probabilities of raw Criteo rows")
async def predict(name: str, body: PredictRequest, models: Models) -> AsciiJSONResponse:
    # the scores are plain floats already: a response FastAPI sends as it is, without validating it again
    return AsciiJSONResponse({"model": name, "scores": await models.predict(name, body)})
