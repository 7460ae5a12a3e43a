"""Errors the services raise for the client's request; the app turns each into its status and a one-line detail."""
from __future__ import annotations


class RequestError(Exception):
    status = 400

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(RequestError):
    status = 404


class Unprocessable(RequestError):
    status = 422


class TooLarge(RequestError):
    status = 413


class Unavailable(RequestError):
    """The cluster cannot do it now (e.g. a deploy waited too long for resources); later it may."""
    status = 503


class RayRefused(RequestError):
    """Ray was reached but refused (no logs, could not stop): the gateway's error."""
    status = 502
