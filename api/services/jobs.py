"""Training jobs: configs validated and submitted to the Ray Jobs API, recorded in SQLite, viewed with Ray's status.

Reading a job never writes: a view asks Ray for the live status; `reconcile` (run by the app in the
background) is the one place that copies Ray's status into the records.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import threading
import time
import uuid

from terarec.core.config import ConfigError, TrainConfig, merge, read_yaml, set_dotted, validate_config
from terarec.core.resources import unfit_reason

from ..errors import NotFound, RayRefused, Unprocessable
from ..job_records import TERMINAL, JobRecord, JobRecords, UnreadableRecord
from ..ray_cluster import RayCluster, RayUnavailable
from ..schemas import JobRequest, JobView
from ..settings import Settings
from ..telemetry import Telemetry

log = logging.getLogger("terarec.api")


def read_default_config(path: str | None) -> dict:
    """The operator's TERAREC_DEFAULT_CONFIG, checked once at start-up (so no request's error comes from it)."""
    if path is None:
        return {}
    tree = read_yaml(path)
    validate_config(merge({"data": "/"}, tree))  # `data` usually comes with each request
    return tree


class JobService:
    def __init__(self, settings: Settings, records: JobRecords, ray: RayCluster, telemetry: Telemetry,
                 default_tree: dict):
        self.settings, self.records, self.ray, self.telemetry = settings, records, ray, telemetry
        self.default_tree = default_tree

    def job_config(self, body: JobRequest, job_id: str) -> TrainConfig:
        """The default config, then the request's config tree, then its overrides, validated.

        Without a run_dir the job writes to STORAGE/<job id>; relative local paths are made absolute here,
        so the job (which runs elsewhere) reads and writes where the caller meant.
        """
        tree = merge(copy.deepcopy(self.default_tree), copy.deepcopy(body.config or {}))
        for key, value in body.overrides.items():
            set_dotted(tree, key, value)
        tree = merge({"run_dir": os.path.join(self.settings.storage, job_id)}, tree)
        for key in ("run_dir", "data"):
            if isinstance(tree.get(key), str) and "://" not in tree[key]:
                tree[key] = os.path.abspath(tree[key])
        try:
            return validate_config(tree)
        except ConfigError as error:
            raise Unprocessable(str(error)) from None

    def submit(self, body: JobRequest) -> JobView:
        job_id = f"terarec-{uuid.uuid4().hex[:12]}"
        config = self.job_config(body, job_id)
        client = self.ray.jobs()
        reason = unfit_reason(config, self.ray.resources())
        if reason:  # it would wait forever
            raise Unprocessable(f"this job can never run on this cluster: {reason}")
        record = self.records.add_job(job_id, config.run_dir, config.model_dump(mode="json"))
        try:
            submit_with_patience(client, entrypoint(self.settings.train_command, config), job_id, config.run_dir)
        except Exception as error:  # the record stays, FAILED with the reason
            log.exception("job %s: submission to Ray failed", job_id)
            self.records.set_job_status(job_id, "FAILED", f"submission to Ray failed: {type(error).__name__}")
            raise RayUnavailable(f"job {job_id}: submission to Ray failed; the job is recorded as FAILED") from None
        self.telemetry.jobs_submitted.inc()
        return self.view(record)

    def list(self, limit: int) -> list[JobView]:
        """Newest first; a record that cannot be read or shown is an UNREADABLE entry, never an error for the list."""
        views = []
        for record in self.records.jobs(limit):
            try:
                views.append(self.view(record) if isinstance(record, JobRecord) else unreadable(record.id))
            except Exception:
                log.exception("job %s: its record cannot be shown", record.id)
                views.append(unreadable(record.id))
        return views

    def get(self, job_id: str) -> JobView:
        return self.view(self.known(job_id))

    def logs(self, job_id: str, tail: int) -> str:
        self.known(job_id)
        try:
            logs = self.ray.jobs().get_job_logs(job_id)
        except RayUnavailable:
            raise
        except Exception:
            log.exception("job %s: no logs from Ray", job_id)
            raise RayRefused(f"Ray has no logs for job {job_id}") from None
        return "\n".join(logs.splitlines()[-tail:])

    def stop(self, job_id: str) -> JobView:
        record = self.known(job_id)
        if record.status not in TERMINAL:
            try:
                self.ray.jobs().stop_job(job_id)
            except RayUnavailable:
                raise
            except Exception:
                log.exception("job %s: Ray could not stop it", job_id)
                raise RayRefused(f"Ray could not stop job {job_id}") from None
        return self.view(record)

    def known(self, job_id: str) -> JobRecord:
        record = self.records.job(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r}")
        return record

    def view(self, record: JobRecord) -> JobView:
        """The record with Ray's live status (unless already final) and the run's latest figures; writes nothing."""
        status, message, reachable = record.status, record.message, True
        if status not in TERMINAL:
            try:
                status, message = live_status(self.ray.jobs(), record)
            except RayUnavailable:
                reachable = False
        result = read_json(os.path.join(record.run_dir, "metrics.json")) if status == "SUCCEEDED" else None
        evaluation, best = evaluations(os.path.join(record.run_dir, "curve.jsonl"))
        return JobView(id=record.id, status=status, message=message, run_dir=record.run_dir, config=record.config,
                       created_at=record.created_at, updated_at=record.updated_at, ray_reachable=reachable,
                       dashboard_url=self.ray.dashboard_link(record.id),
                       progress=last_line(os.path.join(record.run_dir, "curve.jsonl")), result=result,
                       checkpoint=(result or {}).get("checkpoint"), evaluation=evaluation, best=best)

    def reconcile(self) -> None:
        """Copy Ray's status of every unfinished job into its record (the only writer besides submit)."""
        for record in self.records.jobs(limit=1000):
            if isinstance(record, JobRecord) and record.status not in TERMINAL:
                status, message = live_status(self.ray.jobs(), record)
                if (status, message) != (record.status, record.message):
                    self.records.set_job_status(record.id, status, message)

    def reconcile_until(self, stopped: threading.Event) -> None:
        """`reconcile` every TERAREC_RECONCILE_SECONDS until `stopped` is set; Ray being away is not an error."""
        while not stopped.wait(self.settings.reconcile_seconds):
            try:
                self.reconcile()
            except RayUnavailable:
                continue
            except Exception:
                log.exception("reconciling job records with Ray failed")


def unreadable(job_id: str) -> JobView:
    return JobView(id=job_id, status=UnreadableRecord.status, ray_reachable=False,
                   message="this job's record cannot be read or shown (the control plane's log says why)")


def entrypoint(train_command: str, config: TrainConfig) -> str:
    """`terarec train --config-json '<json>'`: the whole config, shell-quoted."""
    return f"{train_command} --config-json {shlex.quote(json.dumps(config.model_dump(mode='json')))}"


SUBMIT_PATIENCE_S = 60.0


def submit_with_patience(client, command: str, job_id: str, run_dir: str,
                         patience_s: float = SUBMIT_PATIENCE_S) -> None:
    """Submit, retrying while Ray says no agent is ready yet (a cluster that just started); nothing was submitted then."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            client.submit_job(entrypoint=command, submission_id=job_id, metadata={"terarec": "train", "run_dir": run_dir})
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def ray_status(client, job_id: str) -> tuple[str, str | None]:
    try:
        info = client.get_job_info(job_id)
    except Exception as error:
        if "404" in str(error) or "does not exist" in str(error):
            return "LOST", "Ray does not know this job any more (was the cluster restarted?)"
        raise RayUnavailable(f"the Ray Jobs API did not answer for job {job_id}") from None
    return str(getattr(info.status, "value", info.status)), info.message


def live_status(client, record: JobRecord) -> tuple[str, str | None]:
    """Ray's status of a recorded job. The record is written before the job is submitted (so a crash mid-submit
    leaves a trace), so Ray not knowing a job is LOST only once its submission must have ended."""
    status, message = ray_status(client, record.id)
    if status == "LOST" and time.time() - record.created_at < SUBMIT_PATIENCE_S + 30:
        return "PENDING", "being submitted to Ray"
    return status, message


def read_json(path: str) -> dict | None:
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def evaluations(path: str) -> tuple[dict | None, dict | None]:
    """(the latest evaluation, the best one) among RUN_DIR/curve.jsonl's evaluation lines."""
    lines = []
    try:
        with open(path) as stream:
            for line in stream:
                try:
                    lines.append(json.loads(line))
                except ValueError:  # a line being written
                    continue
    except (OSError, ValueError):
        return None, None
    lines = [line for line in lines if "auc" in line]
    best = [line for line in lines if line.get("is_best")]
    return (lines[-1] if lines else None), ({"step": best[-1]["step"], "auc": best[-1]["auc"]} if best else None)


def last_line(path: str) -> dict | None:
    """The last complete JSON line of a file that another process appends to."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 64 * 1024))
            lines = stream.read().splitlines()
    except (OSError, ValueError):
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None
