"""The control plane's FastAPI app: routers, the token guard, the body-size limit, JSON errors, metrics.

`create_app(settings)` builds it; `terarec serve` runs it under uvicorn.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from .auth import TokenGuard
from .errors import RequestError
from .job_records import JobRecords
from .ray_cluster import RayCluster, RayUnavailable
from .responses import AsciiJSONResponse, send_json
from .routes import health, jobs, models
from .services.jobs import JobService, read_default_config
from .services.models import ServedModels
from .settings import Settings
from .telemetry import Telemetry

log = logging.getLogger("terarec.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    token = settings.resolved_api_token().encode()

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
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(TokenGuard, token=token)
    app.add_middleware(RequestMetrics, telemetry=app.state.telemetry)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RayUnavailable, _ray_unavailable)
    app.add_exception_handler(Exception, _internal_error)
    return app


def _invalid_request(request: Request, error: RequestValidationError) -> AsciiJSONResponse:
    """422 with one line naming every bad field (the input values are left out: they may be NaN or huge)."""
    problems = [{"field": ".".join(str(part) for part in item["loc"]), "message": item["msg"], "type": item["type"]}
                for item in error.errors()]
    detail = "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems)
    return AsciiJSONResponse({"detail": detail, "errors": problems}, status_code=422)


def _request_error(request: Request, error: RequestError) -> AsciiJSONResponse:
    return AsciiJSONResponse({"detail": error.detail}, status_code=error.status)


def _ray_unavailable(request: Request, error: RayUnavailable) -> AsciiJSONResponse:
    return AsciiJSONResponse({"detail": str(error)}, status_code=503)


def _internal_error(request: Request, error: Exception) -> AsciiJSONResponse:
    """A generic 500: the exception goes to the log under a request id, never to the client."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=error)
    return AsciiJSONResponse({"detail": f"internal error (request id {request_id}; the control plane's log has it)",
                              "request_id": request_id}, status_code=500, headers={"X-Request-ID": request_id})


class _TooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException, so FastAPI's body parsing passes it on as a 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over the limit of {max_bytes} bytes (TERAREC_MAX_REQUEST_BYTES)")


class BodyLimit:
    """413 for request bodies over `max_bytes`: by Content-Length up front, or counted as a chunked body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, {"detail": _TooLarge(self.max_bytes).detail})
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _TooLarge as error:
            if not started:
                await send_json(send, 413, {"detail": error.detail})


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
