"""The bearer-token guard of every /v1 route: ASGI middleware, so a request without the token is refused before
its body is read or parsed (401 with a JSON message). It holds the token's SHA-256, not the token: an inference
replica's own ingress (`replica_ingress.py`) checks tokens without the secret ever leaving the control plane."""
from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends
from fastapi.security import HTTPBearer

from .responses import send_json

# Declares the scheme in the OpenAPI page (the "Authorize" button); the check itself is TokenGuard's.
bearer_scheme = Depends(HTTPBearer(auto_error=False, description="the control plane's API token (TERAREC_API_TOKEN)"))

GUARDED_PREFIX = "/v1/"


def token_digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenGuard:
    def __init__(self, app, token_sha256: bytes):
        self.app = app
        self.token_sha256 = token_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not (scope["path"] + "/").startswith(GUARDED_PREFIX):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        scheme, _, given = (header or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token_digest(given.strip()), self.token_sha256):
            return await self.app(scope, receive, send)
        reason = "missing bearer token" if header is None else "wrong bearer token"
        await send_json(send, 401, {"detail": f"{reason}: send 'Authorization: Bearer <TERAREC_API_TOKEN>'"},
                        [(b"www-authenticate", b"Bearer")])
