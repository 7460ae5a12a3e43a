"""Runs a training job on Ray Train: a local Ray when no cluster is given, one worker per shard."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from terarec.core.checkpoints import CHECKPOINTS_KEPT, CheckpointNotFound, find_checkpoint
from terarec.core.config import ConfigError, TrainConfig
from terarec.core.data.errors import DataNotFoundError
from terarec.core.data.reader import count_rows, list_split_files
from terarec.core.data.schema import read_data_meta
from terarec.core.errors import UserError
from terarec.core.resources import ResourceError, unfit_reason, unreachable_reason, uses_gpu, worker_resources
from terarec.core.steering import choose_sparse_lr, fit_to_data, plan_notes
from terarec.store.snapshot import is_uri
from .plots import plot_curve

RAY_LOG, ERROR_LOG = "ray.log", "error.log"  # in RUN_DIR: Ray's log of the job's processes; a failure's traceback
PLACEMENT_POLL_S = 10.0
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
USER_START_TIMEOUT = os.environ.get(START_TIMEOUT_VAR)  # a value the user set wins over ours
DATA_TIMEOUT_S = 60.0


class JobFailedError(Exception):
    """A job ended in an error that is not the user's to fix (a bug, workers lost past max_failures ...);
    the message is one line and names the file holding the traceback."""



def connect_ray(address: str | None = None, num_cpus: int | None = None) -> str | None:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local Ray. Returns the dashboard URL."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        reason = unreachable_reason(address) if address else None
        if reason:
            raise ConfigError(reason)
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


def check_data(data: str) -> dict[str, list[str]]:
    """The files of train/ and eval/, listed here to fail with the path rather than inside every worker; a store
    that does not answer within DATA_TIMEOUT_S (GCS retries for many minutes) fails too, rather than hang."""
    outcome: list = []

    def list_splits() -> None:
        try:
            outcome.append({split: list_split_files(data, split) for split in ("train", "eval")})
        except Exception as error:  # handed to the caller's thread
            outcome.append(error)

    lister = threading.Thread(target=list_splits, daemon=True)
    lister.start()
    lister.join(DATA_TIMEOUT_S)
    if not outcome:
        raise DataNotFoundError(f"data {data}: no answer in {DATA_TIMEOUT_S:g} s; check the URI, the network and "
                                f"the credentials")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def worker_request(config: TrainConfig) -> tuple[dict[str, float], bool]:
    """What each worker asks of the joined cluster, and whether it takes a GPU. A job the cluster can never hold
    (an autoscaling one: even at its largest) fails here, in one line."""
    import ray
    from ray._private.state import state as ray_state

    cluster = ray.cluster_resources()
    reason = unfit_reason(config, cluster, ray_state.get_max_resources_from_cluster_config())
    if reason:
        raise ResourceError(reason)
    # how often a waiting placement group is given up and asked again: when PendingWatch looks at the clock
    os.environ[START_TIMEOUT_VAR] = USER_START_TIMEOUT or str(min(PLACEMENT_POLL_S, config.resource_timeout_s / 3))
    return worker_resources(config, cluster), uses_gpu(config, cluster)


def runs_in_process(config: TrainConfig) -> bool:
    """Whether the loop runs in this process (Ray Train's local mode) rather than in worker actors: asked for, or
    `auto` with nothing the actors would add: one worker, no restarts, and a Ray that this job starts itself
    (so no other job shares its GPUs or cores)."""
    if config.launch != "auto":
        return config.launch == "in_process"
    joins = config.ray_address or os.environ.get("RAY_ADDRESS")
    return config.workers == 1 and config.max_failures == 0 and not joins


def run_training(config: TrainConfig) -> dict:
    """Train, evaluate, checkpoint; write RUN_DIR/metrics.json and return it (with best_auc, best_step and
    best_checkpoint when the run evaluated periodically)."""
    launched_at = process_started_at()  # time_to_first_step_s counts from here
    files = check_data(config.data)
    train_rows, eval_rows = (count_rows(files[split]) for split in ("train", "eval"))
    meta = read_data_meta(config.data)
    choice = choose_sparse_lr(config, train_rows, meta)
    config = fit_to_data(config, train_rows, meta)
    for note in ([choice.note(config.model)] if choice else []) + plan_notes(config, train_rows, eval_rows):
        print(f"[terarec] note: {note}")
    run_dir = os.path.abspath(config.run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run_dir {run_dir}: cannot create it ({error.strerror}); give a writable directory") from None
    config = config.model_copy(update={"run_dir": run_dir,
                                       "data": config.data if is_uri(config.data) else os.path.abspath(config.data)})
    in_process = runs_in_process(config)
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    loop_config = {"config": config.model_dump(mode="json"), "tty": sys.stdout.isatty(), "launched_at": launched_at,
                   "resume_dir": resume_checkpoint(run_dir, config.resume_from) if config.resume_from else None,
                   # in process, Ray Train keeps no checkpoints: the loop writes them where Ray Train would
                   "checkpoint_root": os.path.join(run_dir, run_name) if in_process else None}

    # Ray starts while a side thread lists the data's column copies and imports Ray Train and the training loop
    # (5-10 s of imports on a slow disk): the start-up costs overlap instead of adding up.
    with ThreadPoolExecutor(1) as pool:
        prepared = pool.submit(_prepare_job_side, files["train"] + files["eval"])
        dashboard = connect_ray(config.ray_address)
        prepared.result()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from terarec.actors.train_controller import PendingWatch
    from terarec.actors.train_worker import train_loop_per_worker

    loop_config["ray_ready_at"] = time.time()  # startup_s splits the time before the workers' start here
    if dashboard:
        print(f"[terarec] Ray dashboard: {dashboard if is_uri(dashboard) else 'http://' + dashboard}")
    per_worker, use_gpu = worker_request(config)
    loop_config |= {"use_gpu": use_gpu, "cpus": per_worker["CPU"]}  # what a worker actor gets from Ray itself
    if in_process:  # Ray Train's notice that local mode is on, and its log line for every report
        for name in ("ray.train.v2.api.config", "ray.train.v2._internal.execution.train_fn_utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
    workers = config.workers if isinstance(config.workers, int) else tuple(config.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=0) if in_process else ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name, storage_path=run_dir,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                             callbacks=[PendingWatch(config, per_worker)]),
    )
    started = time.perf_counter()
    route_worker_logs(os.path.join(run_dir, RAY_LOG))
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise job_error(error, os.path.join(run_dir, ERROR_LOG)) from None
    except Exception as error:  # in process, the loop's own exception arrives unwrapped
        if not in_process:
            raise
        raise job_error(error, os.path.join(run_dir, ERROR_LOG)) from None
    metrics = dict(result.metrics or {})
    metrics |= {"model": config.model, "steps": metrics.get("step"), "train_rows": (metrics.get("step") or 0) * config.batch_size,
                "wall_s": time.perf_counter() - started, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                "use_gpu": use_gpu, "launch": "in_process" if in_process else "workers"}
    with open(os.path.join(run_dir, "metrics.json"), "w") as stream:
        json.dump(metrics, stream, indent=1, default=str)
    plot_curve(run_dir)
    return metrics


def _prepare_job_side(files: list[str]) -> None:
    """While Ray starts: the data's column copies, and the imports run_training needs next (loaded here, they
    are found in sys.modules there)."""
    from terarec.core.data.columns import open_all_columns

    for module in ("ray.train.torch", "terarec.actors.train_worker"):
        importlib.import_module(module)

    if not any(is_uri(path) for path in files):  # URIs are read as parquet
        for column_file in open_all_columns(files, os.cpu_count() or 1):  # built if missing or stale
            column_file.close()


def route_worker_logs(path: str) -> None:
    """From now on, the log lines of the job's Ray processes (workers, controller) go to `path`; the terminal
    keeps terarec's own lines and progress bars. So a failing worker ends in the one
    line `job_error` makes, not in pages of tracebacks, and nothing is lost. Lines keep arriving after fit()
    returns, so the route stays for the life of the driver (the next job moves it to its own file)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    _log_route["path"] = path
    show = dict(dispatcher.handlers).get("ray_print_logs")  # absent when Ray was joined with log_to_driver=False
    if show is None or show is _log_route.get("handler"):
        return

    def route(data: dict) -> None:
        process = f"({data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')})"
        with open(_log_route["path"], "a") as log:
            log.writelines(f"{process} {line}\n" for line in data["lines"])
        shown = [line for line in data["lines"] if line.startswith("[terarec]") or RAY_TQDM_MAGIC in line]
        if shown:
            show({**data, "lines": shown})

    _log_route["handler"] = route
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)


_log_route: dict = {}  # the file route_worker_logs writes to, and its handler once installed


def job_error(error: BaseException, log_path: str) -> Exception:
    """The one-line error for a failed job: the UserError a worker (or PendingWatch) raised, out of Ray Train's
    wrappers, else the innermost cause; the whole traceback, workers' included, goes to `log_path`."""
    from ray.exceptions import RayTaskError

    causes = wrapped_errors(error)
    with open(log_path, "w") as log:
        log.writelines(traceback.format_exception(error))
        log.writelines(f"\n--- wrapped: {type(cause).__name__}\n{cause}\n" for cause in causes[1:])
    user = next((cause for cause in causes if isinstance(cause, UserError) and not isinstance(cause, RayTaskError)), None)
    if user is not None:
        return UserError(f"{user} (traceback: {log_path})")
    innermost = causes[-1]
    first_line = (str(innermost).strip().splitlines() or [""])[0]
    return JobFailedError(f"the job failed: {type(innermost).__name__}: {first_line} (traceback: {log_path})")


def wrapped_errors(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps, outermost first: Ray Train's worker failures (by rank) and controller failure,
    the user exception behind a worker's traceback, a Ray task's cause, Python's __cause__."""
    found: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        failures = getattr(current, "worker_failures", None) or {}
        todo += [failures[rank] for rank in sorted(failures)]
        todo += [getattr(current, name, None) for name in ("controller_failure", "_base_exc", "cause")]
        todo.append(current.__cause__)
    return found
