"""What the routes depend on, handed out through FastAPI's `Depends`: the app's settings and its services.

`create_app` makes each object once and keeps it on `app.state`; only these functions read it there.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .job_records import JobRecords
from .ray_cluster import RayCluster
from .services.jobs import JobService
from .services.models import ServedModels
from .settings import Settings
from .telemetry import Telemetry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_job_records(request: Request) -> JobRecords:
    return request.app.state.job_records


def get_ray_cluster(request: Request) -> RayCluster:
    return request.app.state.ray_cluster


def get_telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


def get_default_config(request: Request) -> dict:
    return request.app.state.default_config


def get_job_service(settings: Annotated[Settings, Depends(get_settings)],
                    records: Annotated[JobRecords, Depends(get_job_records)],
                    ray: Annotated[RayCluster, Depends(get_ray_cluster)],
                    telemetry: Annotated[Telemetry, Depends(get_telemetry)],
                    default_config: Annotated[dict, Depends(get_default_config)]) -> JobService:
    return JobService(settings, records, ray, telemetry, default_config)


async def get_served_models(request: Request) -> ServedModels:
    """async: FastAPI calls it on the event loop, not through a worker thread (a hop on every predict)."""
    return request.app.state.served_models  # keeps Serve handles between requests


Jobs = Annotated[JobService, Depends(get_job_service)]
Models = Annotated[ServedModels, Depends(get_served_models)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
