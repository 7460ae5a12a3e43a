"""What every terarec HTTP app answers the same way, the control plane and an inference replica's own ingress
(`replica_ingress.py`): the bearer token (`auth.py`), the body-size limit, and one-line JSON errors that never echo
what the client sent nor a traceback."""
from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from .auth import TokenGuard
from .errors import RequestError
from .responses import AsciiJSONResponse, send_json

log = logging.getLogger("terarec.api")


def guard(app: FastAPI, token_sha256: bytes, max_request_bytes: int, server: str = "the control plane") -> FastAPI:
    """`app` behind the token check (of the token whose SHA-256 is `token_sha256`) and the body limit, with terarec's
    error replies (a 500 names `server` as the one whose log has the error); middleware added after this call runs
    before these."""
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(TokenGuard, token_sha256=token_sha256)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(RequestError, _request_error)
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


def _internal_error(request: Request, error: Exception) -> AsciiJSONResponse:
    """A generic 500: the exception goes to the log under a request id, never to the client."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=error)
    return AsciiJSONResponse({"detail": f"internal error (request id {request_id}; {request.app.state.server}'s log has it)",
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
