"""The control plane's two ways into Ray: the Jobs API over the dashboard's HTTP, and a driver for Ray Serve.

Ray 2.60 guards the GCS and the dashboard (and with it the Jobs API) with a token when the cluster runs
with `RAY_AUTH_MODE=token` (the default for a local `ray.init()`, and always so in the Helm chart). The
token is found as Ray finds it (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`) and sent as
`Authorization: Bearer <token>` on every Jobs API call. Ray reads `RAY_AUTH_MODE` once, when it is first
imported, and does not turn token mode on by itself for an explicit RAY_ADDRESS: `use_token_auth` sets
it, when a token is known and the mode is unset, and must run before anything imports ray. Nothing here
turns auth off.
"""
from __future__ import annotations

import os
import sys
import threading

from .settings import Settings


class RayUnavailable(RuntimeError):
    """The Ray cluster (dashboard or GCS) could not be reached; the API answers 503 with this message."""


def use_token_auth(settings: Settings) -> None:
    """RAY_AUTH_MODE=token (and the token) for this process, when a token is known; before `import ray`."""
    if "ray" in sys.modules:
        raise RuntimeError("use_token_auth must run before ray is imported: Ray reads RAY_AUTH_MODE at import")
    if settings.ray_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
    if settings.ray_auth_token:
        os.environ.setdefault("RAY_AUTH_TOKEN", settings.ray_auth_token)


class RayCluster:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None
        self._dashboard_url = settings.ray_dashboard_url
        self._lock = threading.Lock()

    def auth_headers(self) -> dict[str, str]:
        token = self.settings.ray_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def dashboard_url(self) -> str:
        """TERAREC_RAY_DASHBOARD_URL, or the dashboard of the cluster the driver joined."""
        if self._dashboard_url is None:
            self.connect_driver()
        if self._dashboard_url is None:
            raise RayUnavailable("the Ray cluster runs no dashboard, so no Jobs API: start its head with "
                                 "`--dashboard-host 127.0.0.1`, or set TERAREC_RAY_DASHBOARD_URL")
        return self._dashboard_url

    def dashboard_link(self, job_id: str) -> str:
        base = self.settings.ray_dashboard_public_url or self._dashboard_url or self.settings.ray_dashboard_url or ""
        return f"{base.rstrip('/')}/#/jobs/{job_id}"

    def jobs(self):
        """A JobSubmissionClient for the dashboard, made once (its constructor checks the cluster's version)."""
        url = self.dashboard_url()
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(url, headers=self.auth_headers())
                except Exception as error:  # connection refused, 401/403, timeouts: all mean "not reachable"
                    raise RayUnavailable(f"the Ray Jobs API at {url} is not reachable: {first_line(error)} "
                                         "(start Ray with `ray start --head --dashboard-host 127.0.0.1`, or set "
                                         "TERAREC_RAY_DASHBOARD_URL and the Ray auth token)") from None
            return self._client

    def resources(self) -> dict[str, float]:
        """What the cluster holds in all (ray.cluster_resources()), as a driver sees it."""
        import ray

        self.connect_driver()
        return ray.cluster_resources()

    def connect_driver(self) -> None:
        """Join the cluster as a Ray driver (for Ray Serve); RAY_ADDRESS or the local cluster."""
        import ray

        from terarec.actors.embedding_server import NAMESPACE

        with self._lock:
            if ray.is_initialized():
                return
            address = self.settings.ray_address or "auto"
            try:
                context = ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="warning")
            except Exception as error:
                raise RayUnavailable(f"cannot join the Ray cluster at {address}: {first_line(error)} "
                                     "(set RAY_ADDRESS, or start Ray with `ray start --head --dashboard-host 127.0.0.1`)") from None
            url = context.address_info.get("webui_url")
            if self._dashboard_url is None and url:
                self._dashboard_url = url if "://" in url else f"http://{url}"


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
