"""Runs a training job on Ray Train: a local Ray when no cluster is given, one worker per shard."""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from terarec.core.checkpoints import CheckpointNotFound, find_checkpoint
from terarec.core.config import ConfigError, TrainConfig
from terarec.core.resources import uses_gpu, worker_resources
from terarec.core.data.reader import count_rows, list_split_files
from terarec.core.steering import fit_to_data, plan_notes
from .plots import plot_curve


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> str | None:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local Ray. Returns the dashboard URL."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": True,
                                                        "dashboard_host": "127.0.0.1"}
        context = ray.init(log_to_driver=True, **kwargs)
        return getattr(context, "dashboard_url", None)
    return None


def process_started_at() -> float:
    """Wall-clock time at which this process started (from /proc on Linux; elsewhere: now)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
            seconds_since_boot = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - seconds_since_boot + start_ticks / os.sysconf("SC_CLK_TCK")


def resume_checkpoint(run_dir: str, resume_from: str) -> str:
    try:
        return os.path.abspath(find_checkpoint(run_dir, resume_from))
    except CheckpointNotFound as error:
        raise ConfigError(f"resume_from={resume_from}: {error}") from None


def run_training(config: TrainConfig) -> dict:
    """Train, evaluate, checkpoint; write RUN_DIR/metrics.json and return it (with best_auc, best_step and
    best_checkpoint when the run evaluated periodically)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from terarec.actors.train_worker import train_loop_per_worker

    launched_at = process_started_at()  # time_to_first_step_s counts from here
    # fail here, with the path, rather than inside every worker
    files = {split: list_split_files(config.data, split) for split in ("train", "eval")}
    train_rows, eval_rows = (count_rows(files[split]) for split in ("train", "eval"))
    config = fit_to_data(config, train_rows)
    for note in plan_notes(config, train_rows, eval_rows):
        print(f"[terarec] note: {note}")
    run_dir = os.path.abspath(config.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    config = config.model_copy(update={"run_dir": run_dir,
                                       "data": config.data if "://" in config.data else os.path.abspath(config.data)})
    loop_config = {"config": config.model_dump(mode="json"), "tty": sys.stdout.isatty(), "launched_at": launched_at,
                   "resume_dir": resume_checkpoint(run_dir, config.resume_from) if config.resume_from else None}

    with ThreadPoolExecutor(1) as pool:  # build the data's column copies while Ray starts: workers only check them
        copies = pool.submit(_prepare_column_copies, files["train"] + files["eval"])
        dashboard = connect_ray(config.ray_address)
        copies.result()
    if dashboard:
        print(f"[terarec] Ray dashboard: {dashboard if '://' in dashboard else 'http://' + dashboard}")
    import ray

    cluster = ray.cluster_resources()
    use_gpu = uses_gpu(config, cluster)
    workers = config.workers if isinstance(config.workers, int) else tuple(config.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(config, cluster)),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=run_dir,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3)),
    )
    started = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics |= {"model": config.model, "steps": metrics.get("step"), "train_rows": (metrics.get("step") or 0) * config.batch_size,
                "wall_s": time.perf_counter() - started, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                "use_gpu": use_gpu}
    with open(os.path.join(run_dir, "metrics.json"), "w") as stream:
        json.dump(metrics, stream, indent=1, default=str)
    plot_curve(run_dir)
    return metrics


def _prepare_column_copies(files: list[str]) -> None:
    from terarec.core.data.columns import open_all_columns

    if not any("://" in path for path in files):  # URIs are read as parquet
        for column_file in open_all_columns(files, os.cpu_count() or 1):
            column_file.close()
