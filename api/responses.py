"""JSON replies written with ASCII escapes, so any text a client sent (a lone surrogate included) can be echoed."""
from __future__ import annotations

import json

from starlette.responses import JSONResponse


class AsciiJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response from ASGI middleware, before (or instead of) the app."""
    payload = AsciiJSONResponse(body).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})
