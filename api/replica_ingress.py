"""An inference replica's own HTTP ingress: POST /v1/models/NAME/predict answered in the replica's process exactly as
the control plane answers it (the same token check, body limit, body readers and one-line errors: `guards.py`,
`predict_bodies.py`), without the control plane's hop and Serve's handle call in between.

The control plane hands a `ReplicaIngress` (its token's SHA-256 and its limits, never the token) to `deploy_model`;
each replica builds its app around its own batched predict (`app`) and serves it on a port of its node
(`actors/inference.py`); GET /v1/models/NAME lists the replicas' addresses as `endpoints`.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request

from .auth import token_digest
from .errors import NotFound
from .guards import guard
from .predict_bodies import Scorer, predict_reply
from .responses import AsciiJSONResponse
from .settings import Settings


@dataclass(frozen=True)
class ReplicaIngress:
    token_sha256: bytes
    max_request_bytes: int
    max_header_bytes: int
    max_predict_rows: int

    @classmethod
    def of(cls, settings: Settings) -> ReplicaIngress:
        return cls(token_digest(settings.resolved_api_token()), settings.max_request_bytes, settings.max_header_bytes,
                   settings.max_predict_rows)

    def app(self, model: str, scorer: Scorer) -> FastAPI:
        """The replica's app: the predict route of `model`, scored by `scorer` (the replica's batched predict)."""
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, default_response_class=AsciiJSONResponse)

        @app.post("/v1/models/{name}/predict")
        async def predict(name: str, request: Request, transformed: bool = False):
            if name != model:
                raise NotFound(f"no model {name!r} on this replica (it serves {model!r}): GET /v1/models/{name} on "
                               "the control plane lists the model's endpoints")
            return await predict_reply(name, request, transformed, self.max_predict_rows, scorer)

        return guard(app, self.token_sha256, self.max_request_bytes, server=f"the replica of model {model}")

    def server_options(self) -> dict:
        """uvicorn's options, as `terarec serve` runs the control plane: h11 bounds a request's head."""
        return {"http": "h11", "h11_max_incomplete_event_size": self.max_header_bytes}
