"""The control plane's two ways into Ray: the Jobs API over the dashboard's HTTP, and a driver for Ray Serve.

Ray 2.60 guards the dashboard (and with it the Jobs API) with a token when the cluster runs with
`RAY_AUTH_MODE=token` (the default for a local `ray.init()`, and always so in the Helm chart). The token
is found as Ray finds it (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`) and sent as
`Authorization: Bearer <token>` on every Jobs API call. Nothing here turns auth off: when a token is
known and `RAY_AUTH_MODE` is unset, the driver connection is made in token mode.
"""
from __future__ import annotations

import os
import threading

from terarec.actors.embedding_server import NAMESPACE

from .settings import Settings


class RayUnavailable(RuntimeError):
    """The Ray cluster (dashboard or GCS) could not be reached; the API answers 503 with this message."""


class RayCluster:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None
        self._lock = threading.Lock()

    def auth_headers(self) -> dict[str, str]:
        token = self.settings.ray_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def jobs(self):
        """A JobSubmissionClient for the dashboard, made once (its constructor checks the cluster's version)."""
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                url = self.settings.ray_dashboard_url
                try:
                    self._client = JobSubmissionClient(url, headers=self.auth_headers())
                except Exception as error:  # connection refused, 401/403, timeouts: all mean "not reachable"
                    raise RayUnavailable(f"the Ray Jobs API at {url} is not reachable: {_first_line(error)} "
                                         "(start Ray with `ray start --head --dashboard-host 127.0.0.1`, or set "
                                         "TERAREC_RAY_DASHBOARD_URL and the Ray auth token)") from None
            return self._client

    def connect_driver(self) -> None:
        """Join the cluster as a Ray driver (for Ray Serve); RAY_ADDRESS or the local cluster."""
        import ray

        with self._lock:
            if ray.is_initialized():
                return
            if self.settings.ray_token and "RAY_AUTH_MODE" not in os.environ:
                os.environ["RAY_AUTH_MODE"] = "token"
            if self.settings.ray_auth_token:
                os.environ.setdefault("RAY_AUTH_TOKEN", self.settings.ray_auth_token)
            address = self.settings.ray_address or "auto"
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="warning")
            except Exception as error:
                raise RayUnavailable(f"cannot join the Ray cluster at {address}: {_first_line(error)} "
                                     "(set RAY_ADDRESS, or start Ray with `ray start --head --dashboard-host 127.0.0.1`)") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
