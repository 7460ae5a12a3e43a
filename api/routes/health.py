"""/healthz (liveness: the process answers; it does not ask Ray) and /metrics (Prometheus), without a token."""
from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..dependencies import TelemetryDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(telemetry: TelemetryDep) -> Response:
    return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)
