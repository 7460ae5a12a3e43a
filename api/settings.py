"""Settings of the control plane, from the environment (pydantic-settings) and `terarec serve` flags."""
from __future__ import annotations

import os
from functools import cached_property

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RAY_TOKEN_PATH = os.path.join("~", ".ray", "auth_token")


def default_home() -> str:
    """The user's data dir for terarec (XDG: ~/.local/share/terarec), where job records live by default."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "terarec")


class Settings(BaseSettings):
    """Every field reads `TERAREC_<NAME>`; the Ray ones read Ray's own variables (`RAY_ADDRESS`, `RAY_AUTH_TOKEN`...)."""

    model_config = SettingsConfigDict(env_prefix="TERAREC_", frozen=True, populate_by_name=True)

    api_token: str | None = Field(default=None, repr=False, description="bearer token of every /v1 route")
    api_token_file: str | None = Field(default=None, description="a file holding the bearer token (instead of api_token)")
    home: str = Field(default_factory=default_home, description="state directory (mode 0700): the job records")
    db_path: str | None = Field(default=None, description="SQLite file of job records (mode 0600); default HOME/jobs.db")
    storage: str = Field(default="runs", description="where jobs write their run directories (a path or a URI)")
    default_config: str | None = Field(default=None, description="YAML config that POST /v1/jobs starts from; read and "
                                       "checked once at start-up, never named in a reply")
    train_command: str = Field(default="terarec train", description="how a job's entrypoint runs training on the "
                               "cluster; `--config-json '<config>'` is appended")
    reconcile_seconds: float = Field(default=5.0, gt=0, description="how often job records are brought up to date "
                                     "with Ray's status (reads never write)")
    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0, description="larger request bodies get 413")
    max_header_bytes: int = Field(default=64 * 1024, gt=0, description="larger request heads are refused unread")
    max_predict_rows: int = Field(default=4096, gt=0, description="rows one predict request may carry")
    ray_dashboard_url: str | None = Field(default=None, description="Ray dashboard / Jobs API; default: the dashboard "
                                          "of the cluster the control plane joins")
    ray_dashboard_public_url: str | None = Field(default=None, description="dashboard address for links, if not the above")
    ray_address: str | None = Field(default=None, validation_alias=AliasChoices("RAY_ADDRESS", "ray_address"),
                                    description="cluster the control plane joins for Ray Serve; default: the local one")
    ray_auth_token: str | None = Field(default=None, repr=False,
                                       validation_alias=AliasChoices("RAY_AUTH_TOKEN", "ray_auth_token"))
    ray_auth_token_path: str | None = Field(default=None,
                                            validation_alias=AliasChoices("RAY_AUTH_TOKEN_PATH", "ray_auth_token_path"))

    def resolved_api_token(self) -> str:
        """The bearer token, from api_token or api_token_file; there is no way to run the API without one."""
        if self.api_token:
            return self.api_token.strip()
        if self.api_token_file:
            try:
                with open(os.path.expanduser(self.api_token_file)) as stream:
                    token = stream.read().strip()
            except OSError as error:
                raise ValueError(f"cannot read the API token file {self.api_token_file}: {error.strerror}") from None
            if token:
                return token
            raise ValueError(f"the API token file {self.api_token_file} is empty")
        raise ValueError("no API token: set TERAREC_API_TOKEN or pass --token-file (every /v1 route needs one)")

    @property
    def job_db(self) -> str:
        return self.db_path or os.path.join(self.home, "jobs.db")

    @cached_property
    def ray_token(self) -> str | None:
        """Ray's dashboard token, found as Ray finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
        if self.ray_auth_token:
            return self.ray_auth_token.strip()
        path = os.path.expanduser(self.ray_auth_token_path or DEFAULT_RAY_TOKEN_PATH)
        try:
            with open(path) as stream:
                return stream.read().strip() or None
        except OSError:
            return None
