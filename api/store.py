"""Job records in SQLite: the control plane's jobs survive its restarts (models live in Ray Serve itself)."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED", "LOST"})  # LOST: Ray no longer knows the job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    message TEXT,
    run_dir TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


@dataclass
class JobRecord:
    id: str
    status: str
    message: str | None
    run_dir: str
    config: dict
    created_at: float
    updated_at: float


class Records:
    """One SQLite file; every call opens its own short transaction (safe from FastAPI's thread pool)."""

    def __init__(self, path: str):
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def _write(self, sql: str, params: tuple) -> None:
        with self._lock, self._connect() as db:
            db.execute(sql, params)

    def add_job(self, job_id: str, run_dir: str, config: dict, status: str = "PENDING") -> JobRecord:
        now = time.time()
        self._write("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, status, None, run_dir, json.dumps(config), now, now))
        return JobRecord(job_id, status, None, run_dir, config, now, now)

    def set_job_status(self, job_id: str, status: str, message: str | None) -> None:
        self._write("UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                    (status, message, time.time(), job_id))

    def job(self, job_id: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, limit: int = 100) -> list[JobRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_job(row) for row in rows]


def _job(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["config"] = json.loads(values["config"])
    return JobRecord(**values)
