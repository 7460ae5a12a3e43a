"""The control plane's FastAPI app: routers, the token guard, the body-size limit, JSON errors, metrics.

`create_app(settings)` builds it; `terarec serve` runs it under uvicorn.
"""
from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from .auth import token_digest
from .guards import guard
from .job_records import JobRecords
from .ray_cluster import RayCluster, RayUnavailable
from .responses import AsciiJSONResponse
from .routes import health, jobs, models
from .services.jobs import JobService, read_default_config
from .services.models import ServedModels
from .settings import Settings
from .telemetry import Telemetry


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    token_sha256 = token_digest(settings.resolved_api_token())

    @asynccontextmanager
    async def reconciling(app: FastAPI):
        """Job records follow Ray's status in a background thread while the app runs (reads never write)."""
        state = app.state
        service = JobService(settings, state.job_records, state.ray_cluster, state.telemetry, state.default_config)
        stopped = threading.Event()
        thread = threading.Thread(target=service.reconcile_until, args=(stopped,), name="reconcile-jobs", daemon=True)
        thread.start()
        yield
        stopped.set()

    app = FastAPI(title="terarec control plane", version="0.1.0", lifespan=reconciling,
                  default_response_class=AsciiJSONResponse,
                  description="Train recommender models on Ray (jobs) and serve them online (models). Every /v1 "
                              "route needs `Authorization: Bearer <TERAREC_API_TOKEN>`.")
    app.state.settings = settings
    app.state.default_config = read_default_config(settings.default_config)
    app.state.job_records = JobRecords(settings.job_db)
    app.state.ray_cluster = RayCluster(settings)
    app.state.telemetry = Telemetry()
    app.state.served_models = ServedModels(settings, app.state.ray_cluster, app.state.telemetry, app.state.job_records)
    for router in (health.router, jobs.router, models.router):
        app.include_router(router)
    guard(app, token_sha256, settings.max_request_bytes)
    app.add_middleware(RequestMetrics, telemetry=app.state.telemetry)
    app.add_exception_handler(RayUnavailable, _ray_unavailable)
    return app


def _ray_unavailable(request: Request, error: RayUnavailable) -> AsciiJSONResponse:
    return AsciiJSONResponse({"detail": str(error)}, status_code=503)


class RequestMetrics:
    """Counts and times every request by its route template (not the raw path: no label explosion)."""

    def __init__(self, app, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, watched_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.telemetry.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            self.telemetry.requests.labels(scope["method"], route, str(status[0])).inc()
