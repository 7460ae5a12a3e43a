"""Prometheus metrics of the control plane, in a registry of its own (one per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Telemetry:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("terarec_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("terarec_http_request_seconds", "HTTP request latency by route",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.jobs_submitted = Counter("terarec_jobs_submitted", "training jobs submitted to Ray", registry=self.registry)
        self.predicted_rows = Counter("terarec_predicted_rows", "rows scored, by model", ["model"], registry=self.registry)
