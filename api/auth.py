"""The bearer-token guard of every /v1 route (constant-time comparison, 401 with a JSON message)."""
from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="the control plane's API token (TERAREC_API_TOKEN)")


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    expected: bytes = request.app.state.api_token
    given = credentials.credentials.encode() if credentials else b""
    if not hmac.compare_digest(given, expected):
        reason = "missing bearer token" if credentials is None else "wrong bearer token"
        raise HTTPException(status_code=401, detail=f"{reason}: send 'Authorization: Bearer <TERAREC_API_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
