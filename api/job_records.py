"""Job records in SQLite: the control plane's jobs survive its restarts (models live in Ray Serve itself).

The file is the control plane's state: its directory is made with mode 0700 and the file with 0600
(SQLite gives its journal the database file's mode).
"""
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


class JobRecords:
    """One SQLite file; every call opens its own short transaction (safe from FastAPI's thread pool)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
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

    def jobs(self, limit: int = 100) -> list[JobRecord | UnreadableRecord]:
        """Newest first; a row that cannot be decoded comes back as an UnreadableRecord, not an error for the list."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        records = []
        for row in rows:
            try:
                records.append(_job(row))
            except (TypeError, ValueError):
                records.append(UnreadableRecord(str(row["id"])))
        return records


@dataclass
class UnreadableRecord:
    id: str
    status: str = "UNREADABLE"


def _job(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["config"] = json.loads(values["config"])
    return JobRecord(**values)
