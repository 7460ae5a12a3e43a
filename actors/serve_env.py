"""Ray Serve settings of terarec's predict path, as the environment variables Ray Serve reads once, when it is
imported: set in the control plane before it imports Ray Serve, and in every inference replica's runtime_env.

Serve's "throughput optimized" mode (bench/README.md, online inference): a replica runs predict on its main event
loop instead of a second thread, buffers its request logs, and a handle reaches replicas over gRPC rather than
Ray actor calls; on 2 cores that took ~2 ms off a single-row request. The handle's router keeps its own event
loop: the control plane also calls handles from worker threads (describe, deploy), which needs it. The mode's
"direct ingress" stays off: it needs Serve's HTTP proxy, would open a port on every replica without the control plane's
token check, and holds every replica 30 s on its way out (a delete, a rollout). A replica's own ingress
(`inference.py::ReplicaIngressServer`, with the control plane's token check) takes its place.
"""
from __future__ import annotations

import os

SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
             "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def use_serve_env() -> None:
    """SERVE_ENV in this process, where the environment does not say otherwise; before `from ray import serve`."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
