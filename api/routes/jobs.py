"""/v1/jobs: training jobs (the work is in services/jobs.py)."""
from __future__ import annotations

from fastapi import APIRouter, Query

from ..auth import bearer_scheme
from ..dependencies import Jobs
from ..schemas import JobList, JobLogs, JobRequest, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[bearer_scheme])


@router.post("", response_model=JobView, status_code=201, summary="submit a training job")
def submit_job(body: JobRequest, jobs: Jobs) -> JobView:
    return jobs.submit(body)


@router.get("", response_model=JobList, summary="list jobs, newest first")
def list_jobs(jobs: Jobs, limit: int = Query(100, ge=1, le=1000)) -> JobList:
    return JobList(jobs=jobs.list(limit))


@router.get("/{job_id}", response_model=JobView, summary="a job: status (as Ray has it), progress, result")
def get_job(job_id: str, jobs: Jobs) -> JobView:
    return jobs.get(job_id)


@router.get("/{job_id}/logs", response_model=JobLogs, summary="the job's driver log (the last `tail` lines)")
def job_logs(job_id: str, jobs: Jobs, tail: int = Query(1000, ge=1, le=100_000)) -> JobLogs:
    return JobLogs(id=job_id, logs=jobs.logs(job_id, tail))


@router.delete("/{job_id}", response_model=JobView, summary="stop a job")
def stop_job(job_id: str, jobs: Jobs) -> JobView:
    return jobs.stop(job_id)
