"""/v1/models: checkpoints served by Ray Serve and the predict route (the work is in services/models.py)."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from ..auth import bearer_scheme
from ..dependencies import Models
from ..predict_bodies import ARROW, predict_reply
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


def _inline(schema: dict, defs: dict) -> dict:
    """A JSON schema with its local `$defs` references written in place (for the OpenAPI page)."""
    if "$ref" in schema:
        return _inline(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    return {key: _inline(value, defs) if isinstance(value, dict) else
            [_inline(item, defs) if isinstance(item, dict) else item for item in value] if isinstance(value, list) else value
            for key, value in schema.items() if key != "$defs"}


# the body is read by predict_bodies.py, not declared: documented here for both content types
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(PredictRequest.model_json_schema(), PredictRequest.model_json_schema()["$defs"])},
    ARROW: {"schema": {"type": "string", "format": "binary", "description": "an Arrow IPC stream with columns "
                       "I1..I13 (numbers) and C1..C26 (integers); the reply is an Arrow stream of `scores`"}}}}}


@router.post("/{name}/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY,
             summary="click probabilities of raw Criteo rows (a JSON or an Arrow body)")
async def predict(name: str, request: Request, models: Models,
                  transformed: bool = Query(False, description="Arrow bodies: dense values are already log(1 + "
                                            "max(x, 0)) (a JSON body says it in its own `transformed`)")) -> Response:
    return await predict_reply(name, request, transformed, models.settings.max_predict_rows,
                               lambda dense, sparse: models.predict(name, dense, sparse))
