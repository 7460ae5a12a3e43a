"""Helpers several test files share (not a test file: pytest collects nothing here): a free port, the small
sharded training job of the Ray tests, and how to compare two runs' final states. The control plane's test
server and its training job are fixtures in conftest.py."""
from __future__ import annotations

import os
import random
import socket
import sys

import torch

from terarec.core.checkpoints import find_checkpoints, open_checkpoint
from terarec.core.config import TrainConfig, load_config
from terarec.core.resources import unfit_reason

JOB_STEPS = 6


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resources_still_held(timeout_s: float = 60) -> str | None:
    """None once every CPU and GPU of the connected Ray cluster is free (waiting up to `timeout_s`); else what is
    held and by which live actors."""
    import time

    import ray
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {kind: total[kind] - free.get(kind, 0.0) for kind in ("CPU", "GPU")
                if total.get(kind, 0.0) - free.get(kind, 0.0) > 1e-6}
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not held:
        return None
    holders = [f"{actor.class_name}({actor.name or actor.actor_id[:8]}, namespace {actor.ray_namespace}): "
               f"{actor.required_resources}" for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
               if any((actor.required_resources or {}).get(kind) for kind in ("CPU", "GPU"))]
    return f"{held} still held after {timeout_s:g} s, by live actors {holders}"


def remove_placement_groups() -> int:
    """Remove every live placement group of the connected Ray cluster (a leaked training job's workers live in
    one: removing it ends them); returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(filters=[("state", "=", "CREATED")], limit=1000)
    for group in groups:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group.placement_group_id))))
    return len(groups)


def wait_until_cluster_idle(timeout_s: float = 60) -> None:
    """Fail naming the holders unless every CPU and GPU of the cluster is free within `timeout_s`.

    Tests that run `terarec train` as a user does get the whole cluster per worker by default, so one actor a
    test before leaked would leave them pending until resource_timeout_s; this fails in seconds with its name."""
    held = resources_still_held(timeout_s)
    assert held is None, f"the session's Ray: {held} (a test before this one leaked them)"


def ray_start_command(temp_dir: str, num_cpus: int, head: str | None = None,
                      *flags: str) -> tuple[list[str], dict[str, int]]:
    """(`ray start --block` of this venv for a head, or for a node joining the head at `head`, with `flags` added;
    {flag: its port}).

    Every port on a free loopback port and the node's own temp dir, so several clusters on one machine (other
    sessions', a test's own) never share a port or find each other; the caller starts it in its own session
    (process group) and ends it by that group, never with `ray stop` (which stops every cluster on the machine)."""
    port_flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                  "--node-manager-port", "--object-manager-port", "--runtime-env-agent-port"]
    if head is None:
        port_flags += ["--port", "--dashboard-port", "--ray-client-server-port"]
    ports = {flag: free_port() for flag in port_flags}
    first_worker_port = random.randrange(20_000, 60_000, 100)
    while any(first_worker_port <= port < first_worker_port + 100 for port in ports.values()):
        first_worker_port = random.randrange(20_000, 60_000, 100)  # Ray refuses a range holding a component's port
    command = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--num-cpus", str(num_cpus),
               "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats",
               "--min-worker-port", str(first_worker_port), "--max-worker-port", str(first_worker_port + 99)]
    command += ["--address", head] if head else ["--head", "--dashboard-host", "127.0.0.1"]
    command += flags
    command += [str(item) for pair in ports.items() for item in pair]
    return command, ports


def job_overrides(workers, **extra) -> list[str]:
    """--set key=value settings of the small job (also passed to the CLI)."""
    settings = {"workers": workers, "cpus_per_worker": 0.5, "embedding.dim": 8, "dlrm.bottom_mlp": "[16]",
                "dlrm.top_mlp": "[16]", "embedding.num_buckets": 64, "embedding.optimizer": "adam", "embedding.lr": 0.02,
                "eval_rows": 2000, "eval_every": 0, "log_every": 2, "steps": JOB_STEPS, "batch_size": 240, "seed": 5} | extra
    return [f"{key}={value}" for key, value in settings.items()]


def job(data, run_dir, workers, **extra) -> TrainConfig:
    """The small DLRM job of the Ray tests at `workers` (N or "[min,max]"), with `extra` settings; the test
    skips where this machine can never hold it (2 GPU workers on one GPU)."""
    import pytest
    import ray

    config = load_config(overrides=job_overrides(workers, **extra), flags={"data": data, "run_dir": str(run_dir)})
    reason = unfit_reason(config, ray.cluster_resources())
    if reason:
        pytest.skip(f"this machine cannot hold the job: {reason}")
    return config


def one_worker_run(overrides: list[str], data, run_dir) -> str:
    """The job of `overrides` trained uninterrupted by one worker in this process: the trainer Ray Train runs,
    without Ray (world size 1 needs no cluster), as the reference of runs that lost a worker. Returns the run dir,
    holding its final checkpoint (N workers train as one does: tests/test_distributed.py)."""
    from terarec.actors.train_worker import TrainWorker
    from terarec.core.data.reader import count_rows, list_split_files
    from terarec.core.steering import fit_to_data
    from terarec.kernels.comm import LocalCommunicator

    config = load_config(overrides=overrides, flags={"data": data, "run_dir": str(run_dir)})
    config = fit_to_data(config, count_rows(list_split_files(data, "train")))  # as the runner does
    worker = TrainWorker(config, LocalCommunicator(), torch.device("cpu"))
    worker.train()
    assert worker.step == config.steps
    worker.save(str(run_dir))
    return str(run_dir)


def committed_checkpoint(run_dir) -> dict | None:
    """The metrics of the latest checkpoint Ray Train has committed under `run_dir` (written by every rank and
    registered: its checkpoint_manager_snapshot.json names it; a checkpoint directory alone may be half-written,
    and a restart would not find it), or None."""
    import glob
    import json
    import os

    for snapshot in glob.glob(os.path.join(str(run_dir), "*", "checkpoint_manager_snapshot.json")):
        try:
            with open(snapshot) as stream:
                return json.load(stream)["latest_checkpoint_result"]["metrics"]
        except (OSError, ValueError, KeyError, TypeError):  # being written
            pass
    return None


def final_state(metrics):
    """(dense params, keys sorted, values sorted) of the run's final checkpoint."""
    checkpoint = open_checkpoint(metrics["checkpoint"])
    keys, values = checkpoint.load_rows().export()
    return checkpoint.dense_state["model"], keys, values


def assert_same_training(a, b):
    dense_a, keys_a, values_a = a
    dense_b, keys_b, values_b = b
    assert dense_a.keys() == dense_b.keys()
    for name in dense_a:
        torch.testing.assert_close(dense_a[name], dense_b[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")
    assert torch.equal(keys_a, keys_b)
    torch.testing.assert_close(values_a, values_b, rtol=1e-4, atol=1e-5)


def checkpoint_at(run_dir, step):
    checkpoints = find_checkpoints(str(run_dir))
    assert step in checkpoints, f"no checkpoint at step {step} under {run_dir}: {sorted(checkpoints)}"
    return checkpoints[step]
