"""Sharded training on a real local Ray: N workers equal 1, exact resume, resharding, a killed worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import (JOB_STEPS, assert_same_training, checkpoint_at, committed_checkpoint, final_state, job,
                     job_overrides, one_worker_run)

from terarec.platform.runner import run_training

pytestmark = pytest.mark.slow
STEPS, HALF = JOB_STEPS, JOB_STEPS // 2
KILLED_STEPS = 120


@pytest.fixture(scope="module")
def runs(ray_cluster, synth_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for workers in (1, 2, 3):
        out[workers] = run_training(job(synth_data, base / f"w{workers}", workers, checkpoint_every=HALF))
    out["base"] = base
    return out


@pytest.mark.parametrize("workers", [2, 3])
def test_n_workers_equal_one_worker(runs, workers):
    assert runs[workers]["steps"] == STEPS
    assert_same_training(final_state(runs[1]), final_state(runs[workers]))
    assert abs(runs[1]["auc"] - runs[workers]["auc"]) < 1e-4


@pytest.mark.parametrize("first, second", [(1, 1), (2, 3), (3, 2)], ids=["resume", "reshard-2-to-3", "reshard-3-to-2"])
def test_resume_and_reshard_equal_an_uninterrupted_run(runs, synth_data, first, second):
    middle = checkpoint_at(runs["base"] / f"w{first}", HALF)
    resumed = run_training(job(synth_data, runs["base"] / f"resume-{first}-{second}", second, resume_from=middle))
    assert resumed["steps"] == STEPS
    assert_same_training(final_state(runs[1]), final_state(resumed))


def test_a_killed_worker_restarts_from_the_checkpoint(ray_cluster, synth_data, tmp_path):
    """SIGKILL one training worker mid-run: Ray Train restarts the group from the last checkpoint."""
    from ray.util.state import list_actors

    run_dir = tmp_path / "killed"
    job(synth_data, tmp_path / "killed", 2)  # skips where this machine cannot hold two workers
    settings = job_overrides(2, steps=KILLED_STEPS, batch_size=2400, checkpoint_every=20, max_failures=2)
    command = [sys.executable, "-m", "terarec.platform.cli", "train", "--data", synth_data, "--run-dir", str(run_dir)]
    command += [arg for setting in settings for arg in ("--set", setting)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and killed is None:
        if (committed_checkpoint(run_dir) or {}).get("step", 0) >= 20:
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed is not None, "the run never wrote its first checkpoint"
    assert process.wait(timeout=300) == 0, "".join(output)
    reader.join(timeout=5)
    log = "".join(output)
    restored = [int(line.split("restored step ")[1].split()[0]) for line in log.splitlines() if "restored step" in line]
    assert restored and min(restored) >= 20, log  # restarted from a checkpoint, not from scratch
    metrics = final_state({"checkpoint": checkpoint_at(run_dir, KILLED_STEPS)})
    uninterrupted = one_worker_run(job_overrides(1, steps=KILLED_STEPS, batch_size=2400), synth_data, tmp_path / "one")
    assert_same_training(final_state({"checkpoint": uninterrupted}), metrics)


def test_elastic_worker_range_trains_like_a_fixed_run(runs, synth_data):
    """workers=[1, 2] becomes Ray Train's elastic num_workers=(1, 2); any size it gets trains the same."""
    elastic = run_training(job(synth_data, runs["base"] / "elastic", "[1,2]"))
    assert elastic["steps"] == STEPS and elastic["world_size"] in (1, 2)
    assert_same_training(final_state(runs[1]), final_state(elastic))


def test_worker_metrics_reach_rays_prometheus_endpoint(ray_cluster, synth_data, tmp_path):
    """samples/s, loss, shard rows, exchange bytes, store figures and the evaluations show on the node's /metrics
    while training."""
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    seen: set[str] = set()
    wanted = {"ray_terarec_samples_per_s", "ray_terarec_loss", "ray_terarec_shard_rows", "ray_terarec_exchange_mb",
              "ray_terarec_store", "ray_terarec_eval"}

    def poll():
        deadline = time.time() + 120
        while time.time() < deadline and not wanted <= seen:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                seen.update(line.split("{")[0] for line in text.splitlines() if line.startswith("ray_terarec_"))
            except OSError:
                pass
            time.sleep(1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    run_training(job(synth_data, tmp_path / "metrics", 2, steps=400, log_every=5, eval_every=50))
    poller.join(timeout=60)
    assert wanted <= seen, seen
