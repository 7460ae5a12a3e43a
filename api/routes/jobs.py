"""/v1/jobs: training jobs submitted to the Ray Jobs API, recorded in SQLite, reconciled with Ray on read."""
from __future__ import annotations

import copy
import json
import os
import shlex
import time
import uuid

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from terarec.core.config import ConfigError, TrainConfig, merge, read_yaml, set_dotted, validate_config
from terarec.store.snapshot import is_uri

from ..auth import require_token
from ..ray_cluster import RayUnavailable
from ..schemas import JobList, JobLogs, JobRequest, JobView
from ..store import TERMINAL, JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)])


def job_config(body: JobRequest, default_config: str | None, storage: str, job_id: str) -> TrainConfig:
    """The request's config tree (or YAML path, or the default file) plus overrides, validated.

    Without a run_dir the job writes to STORAGE/<job id>; relative local paths are made absolute here,
    so the job (which runs elsewhere) reads and writes where the caller meant.
    """
    source = body.config if body.config is not None else default_config
    tree = read_yaml(source) if isinstance(source, str) else copy.deepcopy(source or {})
    for key, value in body.overrides.items():
        set_dotted(tree, key, value)
    tree = merge({"run_dir": os.path.join(storage, job_id)}, tree)
    for key in ("run_dir", "data"):
        if isinstance(tree.get(key), str) and not is_uri(tree[key]):
            tree[key] = os.path.abspath(tree[key])
    return validate_config(tree)


def entrypoint(train_command: str, config: TrainConfig) -> str:
    """`terarec train --config-json '<json>'`: the whole config, shell-quoted."""
    return f"{train_command} --config-json {shlex.quote(json.dumps(config.model_dump(mode='json')))}"


@router.post("", response_model=JobView, status_code=201, summary="submit a training job")
def submit_job(body: JobRequest, request: Request) -> JobView:
    state = request.app.state
    job_id = f"terarec-{uuid.uuid4().hex[:12]}"
    try:
        config = job_config(body, state.settings.default_config, state.settings.storage, job_id)
    except ConfigError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    client = state.ray.jobs()
    record = state.records.add_job(job_id, config.run_dir, config.model_dump(mode="json"))
    try:
        submit(client, entrypoint(state.settings.train_command, config), job_id, config.run_dir)
    except Exception as error:  # the record stays, FAILED with the reason
        message = f"submission to Ray failed: {error}"
        state.records.set_job_status(job_id, "FAILED", message)
        raise HTTPException(status_code=503, detail=f"job {job_id}: {message}") from None
    state.telemetry.jobs_submitted.inc()
    return job_view(state, record)


def submit(client, command: str, job_id: str, run_dir: str, patience_s: float = 60.0) -> None:
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


@router.get("", response_model=JobList, summary="list jobs, newest first")
def list_jobs(request: Request, limit: int = Query(100, ge=1, le=1000)) -> JobList:
    state = request.app.state
    return JobList(jobs=[job_view(state, record) for record in state.records.jobs(limit)])


@router.get("/{job_id}", response_model=JobView, summary="a job: status (as Ray has it), progress, result")
def get_job(job_id: str, request: Request) -> JobView:
    return job_view(request.app.state, known_job(request, job_id))


@router.get("/{job_id}/logs", response_model=JobLogs, summary="the job's driver log (the last `tail` lines)")
def job_logs(job_id: str, request: Request, tail: int = Query(1000, ge=1, le=100_000)) -> JobLogs:
    known_job(request, job_id)
    try:
        logs = request.app.state.ray.jobs().get_job_logs(job_id)
    except RayUnavailable:
        raise
    except Exception as error:
        raise HTTPException(status_code=502, detail=f"Ray has no logs for job {job_id}: {error}") from None
    return JobLogs(id=job_id, logs="\n".join(logs.splitlines()[-tail:]))


@router.delete("/{job_id}", response_model=JobView, summary="stop a job")
def stop_job(job_id: str, request: Request) -> JobView:
    state = request.app.state
    record = known_job(request, job_id)
    if record.status not in TERMINAL:
        try:
            state.ray.jobs().stop_job(job_id)
        except RayUnavailable:
            raise
        except Exception as error:
            raise HTTPException(status_code=502, detail=f"Ray could not stop job {job_id}: {error}") from None
    return job_view(state, record)


def known_job(request: Request, job_id: str) -> JobRecord:
    record = request.app.state.records.job(job_id)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return record


def job_view(state, record: JobRecord) -> JobView:
    """The record with its status reconciled with Ray's (unless already final) and the run's latest figures."""
    reachable = True
    if record.status not in TERMINAL:
        try:
            status, message = ray_status(state.ray.jobs(), record.id)
        except RayUnavailable:
            reachable = False
        else:
            if (status, message) != (record.status, record.message):
                state.records.set_job_status(record.id, status, message)
                record = state.records.job(record.id)
    result = read_json(os.path.join(record.run_dir, "metrics.json")) if record.status == "SUCCEEDED" else None
    evaluation, best = evaluations(os.path.join(record.run_dir, "curve.jsonl"))
    return JobView(id=record.id, status=record.status, message=record.message, run_dir=record.run_dir,
                   config=record.config, created_at=record.created_at, updated_at=record.updated_at,
                   ray_reachable=reachable, dashboard_url=f"{state.settings.dashboard_link_base}/#/jobs/{record.id}",
                   progress=last_line(os.path.join(record.run_dir, "curve.jsonl")), result=result,
                   checkpoint=(result or {}).get("checkpoint"), evaluation=evaluation, best=best)


def ray_status(client, job_id: str) -> tuple[str, str | None]:
    try:
        info = client.get_job_info(job_id)
    except Exception as error:
        if "404" in str(error) or "does not exist" in str(error):
            return "LOST", "Ray does not know this job any more (was the cluster restarted?)"
        raise RayUnavailable(str(error)) from None
    return str(getattr(info.status, "value", info.status)), info.message


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
    except OSError:
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
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None
