"""The training worker: one Ray Train worker owns one embedding shard and one dense replica.

`TrainWorker` is a plain class (testable without Ray, given a Communicator);
`train_loop_per_worker` is the shell Ray Train runs on each worker.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from terarec.kernels.comm import Communicator, LocalCommunicator
from terarec.kernels.dispatch import autocast_dtype
from terarec.kernels.precision import autocast, matmul_precision
from terarec.models import Batch, SparseDenseOptimizer
from terarec.models.graphed import GraphedHead, graphable
from terarec.core.build import label_columns_for, model_from_config, store_from_config
from terarec.core.checkpoints import CHECKPOINTS_KEPT, open_checkpoint, save_checkpoint
from terarec.core.config import TrainConfig
from terarec.core.data.parquet import open_parquet
from terarec.core.errors import CheckpointError
from terarec.core.data.reader import BatchReader, count_rows, list_split_files
from terarec.core.data.schema import label_columns_of, read_data_meta
from terarec.core.metrics import calibration, log_loss, roc_auc
from terarec.core.steering import BestTracker, fit_to_data, key_recurrence, lr_factor
from terarec.store.sharded import BucketMap, ShardedRows


@dataclass
class StepLog:
    step: int
    loss: float
    samples_per_s: float
    exchange_mb: float
    exchange_s: float


def with_next(batches: Iterable[Batch]) -> Iterator[tuple[Batch, Batch | None]]:
    """(batch, the batch after it or None), reading one batch ahead."""
    iterator = iter(batches)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        yield current, following
        current = following


def expected_shard_rows(meta: dict, train_rows: int, world_size: int) -> int | None:
    """A shard's share of the distinct keys the training data holds, as meta.json tells it (convert's vocabulary
    sizes, or the distinct keys expected from synth's cardinalities and Zipf exponent among train_rows draws:
    `core.steering.key_recurrence`), or None: the device store starts that large instead of doubling through
    the first steps (each doubling copies the rows and rehashes the index while the GPU waits)."""
    recurrence = key_recurrence(meta, train_rows)
    return None if recurrence is None else max(1, math.ceil(recurrence.distinct_keys / world_size))


class TrainWorker:
    """Builds the shard, the model and the optimizers for one rank, and runs the loop."""

    def __init__(self, config: TrainConfig, comm: Communicator, device: torch.device,
                 reader_threads: int | None = None):
        self.comm = comm
        self.device = device
        self.reader_threads = reader_threads  # this worker's share of the node's cores (None: the reader's default)
        self.first_batch_at: float | None = None  # wall clock when this process's first batch had arrived
        self.first_step_at: float | None = None  # wall clock when this process's first step had finished
        self.rank, self.world_size = comm.rank, comm.world_size
        self.train_files = list_split_files(config.data, "train")
        self.eval_files = list_split_files(config.data, "eval")
        meta = read_data_meta(config.data)
        train_rows = count_rows(self.train_files)
        self.config = config = fit_to_data(config, train_rows, meta)
        self.label_columns = label_columns_for(config, label_columns_of(open_parquet(self.train_files[0]).schema_arrow))
        self.total_steps = config.steps or max(1, train_rows // config.batch_size)

        torch.manual_seed(config.seed)  # identical dense replicas on every rank
        self.store = store_from_config(config, device, self.rank,
                                       expected_rows=expected_shard_rows(meta, train_rows, self.world_size))
        self.rows = ShardedRows(self.store, comm, config.embedding.num_buckets,
                                config.embedding.comm_dtype, config.embedding.grad_comm_dtype)
        backend = self.rows if self.world_size > 1 else self.store
        self.model = model_from_config(config, backend, num_tasks=len(self.label_columns)).to(device)
        self.dense_params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer_cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}
        name = config.dense_optimizer.name
        # On CUDA, Adam and SGD step every dense tensor in one fused kernel (foreach Adam launched ~10 kernels
        # and took 0.4 ms of a 6.6 ms DLRM step on an H200); torch's fused Adagrad is CPU-only.
        fused = {"fused": True} if device.type == "cuda" and name in ("adam", "sgd") else {}
        self.optimizer = SparseDenseOptimizer(
            self.model, optimizer_cls[name](self.dense_params, lr=config.dense_optimizer.lr, **fused))
        self.step = 0
        self._head_graph: GraphedHead | bool | None = None  # None: not tried yet; False: the step stays eager
        self._steps_here = 0  # steps run by this process (a resumed run's step counter starts higher)
        self.last_log = StepLog(0, math.nan, 0.0, 0.0, 0.0)  # the latest log window
        stopping = config.early_stopping
        self.tracker = BestTracker(stopping.patience if stopping else None, stopping.min_delta if stopping else 0.0)
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest evaluation
        self.stop_reason: str | None = None

    # ---- one step -------------------------------------------------------------------------
    def train_step(self, batch: Batch, following: Batch | None = None) -> torch.Tensor:
        """Forward, backward, exchange, updates. Returns this rank's share of the global mean loss.

        With `following` (the next batch), a tiered store makes its rows resident ahead (`Embedding.prepare`: a
        planned lookup, once this step's update is queued; with several shards, a prefetch once this batch's rows
        are read), so that the reads from host or SSD overlap this batch's backward and updates."""
        with matmul_precision(self.config.precision):  # TF32 for the backward and the optimizer too
            return self._train_step(batch, following)

    def _train_step(self, batch: Batch, following: Batch | None) -> torch.Tensor:
        self.model.train()
        batch = batch.to(self.device, non_blocking=True)
        with autocast(self.config.precision, self.device):
            logits = self._forward(batch).float()
        # A planning store readies the next lookup once this step's update is queued (the host plans while the GPU
        # runs the backward); a prefetch hint goes before the backward, so that its reads overlap it.
        plans = self.model.embedding.plans
        if following is not None and not plans:
            self.model.embedding.prepare(following.sparse.to(self.device), ready=following.ready)
        labels = batch.labels[:, : len(self.label_columns)]
        # Each rank divides by the global batch: summing the ranks' losses gives the global mean,
        # so summed gradients equal one worker's gradients on the whole global batch.
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        loss = loss / (self.config.batch_size * labels.shape[1])
        # One worker lets backward write fresh gradients (no memset per tensor); several keep them allocated,
        # as the all-reduce flattens every one.
        self.optimizer.zero_grad(set_to_none=self.world_size == 1)
        loss.backward()
        self._all_reduce_dense_grads()
        self.optimizer.step()  # the embeddings' sparse updates, then the dense step
        if following is not None and plans:
            self.model.embedding.prepare(following.sparse.to(self.device), ready=following.ready)
        self.step += 1
        self._steps_here += 1
        return loss.detach()

    def _forward(self, batch: Batch) -> torch.Tensor:
        """The training forward: the lookup eagerly, then the model's head from CUDA graphs once captured
        (on CUDA, `cuda_graphs` on, a model with a head and no dropout; captured at the second step, after
        one eager step has compiled and autotuned every kernel)."""
        if self._head_graph is None and self._steps_here >= 1:
            self._head_graph = self._capture_head(batch)
        if not self._head_graph:
            return self.model(batch)
        rows = self.model.embedding(batch.sparse)
        if not self._head_graph.fits(batch.dense, rows):  # a batch of another shape runs eagerly
            return self.model.head(batch.dense, rows)
        return self._head_graph(batch.dense, rows)

    def _capture_head(self, batch: Batch) -> GraphedHead | bool:
        if not (self.config.cuda_graphs and self.device.type == "cuda" and graphable(self.model)):
            return False
        sparse_shape = (*batch.sparse.shape, self.model.embedding.dim)
        dtype = autocast_dtype(batch.dense) or torch.float32  # what the Embedding's gather hands the head
        try:
            return GraphedHead(self.model, batch.dense, torch.zeros(sparse_shape, device=self.device, dtype=dtype,
                                                                    requires_grad=True))
        except Exception as error:  # a path a graph cannot hold: the step stays eager, and says so once
            log_line(f"[terarec] rank {self.rank}: the dense part stays eager; CUDA graph capture failed: "
                     f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            return False

    def _all_reduce_dense_grads(self) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad for p in self.dense_params]
        flat = torch.cat([g.flatten() for g in grads])
        self.comm.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    # ---- loop -------------------------------------------------------------------------------
    def train(self, on_log: Callable[[StepLog], None] | None = None,
              on_checkpoint: Callable[[int, bool], None] | None = None,
              on_eval: Callable[[int, dict[str, float], bool], None] | None = None) -> StepLog:
        """Train to total_steps (or until early stopping); on_checkpoint(step, final), on_eval(step, metrics,
        is_best) as they happen."""
        config = self.config
        # Batches arrive on the device, copied on a side stream while the previous step runs; the loop reads
        # nothing back from the device but the loss, once per log window.
        reader = BatchReader(self.train_files, config.batch_size, rank=self.rank, world_size=self.world_size,
                             seed=config.seed, shuffle=True, drop_last=True, start_step=self.step,
                             device=self.device, threads=self.reader_threads)
        window_start, window_steps, loss_sum = time.perf_counter(), 0, torch.zeros((), device=self.device)
        # A tiered store stages the next batch's rows ahead (with several shards, through an early key
        # exchange: every rank takes part, as the store kind and the batch stream are the same on all).
        prefetch = config.store.kind != "device"
        with reader:
            for batch, following in with_next(reader) if prefetch else ((batch, None) for batch in reader):
                if self.step >= self.total_steps:
                    break
                if self.first_batch_at is None:
                    self.first_batch_at = time.time()
                self._apply_lr_schedules()
                ahead = prefetch and self.step + 1 < self.total_steps
                loss_sum += self.train_step(batch, following if ahead else None)
                if self.first_step_at is None:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # once: when the first step has really finished
                    self.first_step_at = time.time()
                window_steps += 1
                last = self.step == self.total_steps
                # Every epoch's end too: CTR models peak there and overfit as the next epoch begins (the
                # "one-epoch phenomenon"), so a cadence that steps over the boundary misses the best model.
                epoch_end = self.step % reader.steps_per_epoch == 0
                if config.eval_every and (self.step % config.eval_every == 0 or epoch_end or last):
                    eval_started = time.perf_counter()
                    self._evaluate_and_steer(on_eval)
                    window_start += time.perf_counter() - eval_started  # samples/s counts training time only
                    last = last or self.stop_reason is not None
                if self.step % config.log_every == 0 or last:
                    self.last_log = self._window_log(loss_sum, window_steps, window_start)
                    if on_log:
                        on_log(self.last_log)
                    window_start, window_steps, loss_sum = time.perf_counter(), 0, torch.zeros_like(loss_sum)
                if on_checkpoint and (last or (config.checkpoint_every and self.step % config.checkpoint_every == 0)):
                    on_checkpoint(self.step, last)
                if self.stop_reason:
                    break
        return self.last_log

    def _apply_lr_schedules(self) -> None:
        """Dense and sparse learning rates for the coming step, from their schedules."""
        config = self.config
        dense_lr = config.dense_optimizer.lr * lr_factor(config.dense_optimizer.schedule, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = dense_lr
        sparse_lr = config.sparse_lr * lr_factor(config.embedding.schedule, self.step, self.total_steps)
        if sparse_lr != self.store.optimizer.lr:  # sparse optimizers are frozen: a new one with the new lr
            self.store.optimizer = replace(self.store.optimizer, lr=sparse_lr)

    def _evaluate_and_steer(self, on_eval: Callable[[int, dict[str, float], bool], None] | None) -> None:
        """Evaluate; keep the best checkpoint (keep_best); decide whether to stop early."""
        metrics = self.evaluate()
        self.last_eval = (self.step, metrics)
        is_best = self.tracker.update(self.step, metrics["auc"])
        if is_best and self.config.keep_best:
            self.save_best()
        if on_eval:
            on_eval(self.step, metrics, is_best)
        if self.tracker.should_stop and self.step < self.total_steps:  # at the last step the run ends anyway
            self.stop_reason = self.tracker.stop_reason(self.step)

    def final_metrics(self) -> dict:
        """The end-of-run figures: eval metrics at this step (reusing an evaluation made at it), the best
        evaluation, why the run stopped early (if it did), and the last training window."""
        metrics = self.last_eval[1] if self.last_eval and self.last_eval[0] == self.step else self.evaluate()
        metrics = dict(metrics, loss=self.last_log.loss, samples_per_s=self.last_log.samples_per_s)
        if self.tracker.best_step is not None:
            metrics |= {"best_auc": self.tracker.best_auc, "best_step": self.tracker.best_step,
                        "best_checkpoint": self.best_dir if self.config.keep_best else None}
        if self.stop_reason:
            metrics["stopped_early"] = self.stop_reason
        return metrics

    def _window_log(self, loss_sum: torch.Tensor, steps: int, started: float) -> StepLog:
        total = self.comm.all_reduce(loss_sum.clone().reshape(1)).item()
        elapsed = time.perf_counter() - started
        stats = self.rows.stats
        log = StepLog(self.step, total / max(steps, 1), steps * self.config.batch_size / max(elapsed, 1e-9),
                      stats.bytes_sent / 1e6, stats.seconds)
        stats.bytes_sent, stats.seconds = 0, 0.0
        return log

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """AUC and log loss per task over the eval split (every rank takes part; all ranks get the result).

        Each eval batch is gathered in rank order, which is the global row order, so the figures do
        not depend on the worker count.
        """
        self.model.eval()
        config = self.config
        tasks = len(self.label_columns)
        batch_size = max(self.world_size, config.eval_batch_size // self.world_size * self.world_size)
        gathered, rows = [], 0
        with BatchReader(self.eval_files, batch_size, rank=self.rank, world_size=self.world_size,
                         shuffle=False, drop_last=False, epochs=1, device=self.device,
                         threads=self.reader_threads) as reader:
            for batch in reader:
                with matmul_precision(config.precision), autocast(config.precision, self.device):
                    logits = self.model(batch).float()
                local = torch.cat([logits, batch.labels[:, :tasks]], dim=1).cpu()
                gathered.append(torch.cat(self.comm.all_gather(local)))
                rows += gathered[-1].shape[0]
                if config.eval_rows and rows >= config.eval_rows:
                    break
        everything = torch.cat(gathered)[: config.eval_rows] if gathered else torch.zeros(0, 2 * tasks)
        all_logits, all_labels = everything[:, :tasks], everything[:, tasks:]
        metrics: dict[str, float] = {"eval_rows": float(all_logits.shape[0])}
        for task, column in enumerate(self.label_columns):
            suffix = "" if task == 0 else f"_{column.removeprefix('label_')}"
            metrics[f"auc{suffix}"] = roc_auc(all_labels[:, task], all_logits[:, task])
            metrics[f"logloss{suffix}"] = log_loss(all_labels[:, task], all_logits[:, task])
            metrics[f"mean_pred{suffix}"], metrics[f"mean_label{suffix}"] = calibration(all_labels[:, task],
                                                                                      all_logits[:, task])
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """This rank's shard; rank 0 adds the dense model, the optimizer and the position in the data."""
        save_checkpoint(directory, self.comm, self.device, self.store, self.step, self.config, self.label_columns,
                        {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    @property
    def best_dir(self) -> str:
        return os.path.join(self.config.run_dir, "best")

    def save_best(self) -> None:
        """Every rank writes into RUN_DIR/best.partial; rank 0 then swaps it for RUN_DIR/best, so a reader
        never sees half a checkpoint (RUN_DIR is on a filesystem every worker shares)."""
        staging = self.best_dir + ".partial"
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        self._barrier()
        self.save(staging)
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(staging, self.best_dir)

    def _barrier(self) -> None:
        self.comm.all_reduce(torch.zeros(1))

    def restore(self, directory: str) -> int:
        """Load a checkpoint written by any world size: this rank keeps the keys of the buckets it owns now."""
        checkpoint = open_checkpoint(directory)
        if checkpoint.meta["num_buckets"] != self.config.embedding.num_buckets:
            raise CheckpointError(f"checkpoint {directory} has {checkpoint.meta['num_buckets']} buckets; the job has "
                             f"embedding.num_buckets={self.config.embedding.num_buckets}")
        self.model.load_state_dict(checkpoint.dense_state["model"])
        self.optimizer.load_state_dict(checkpoint.dense_state["optimizer"])
        checkpoint.load_rows(self.store, keep=BucketMap(self.config.embedding.num_buckets, self.world_size).owns(self.rank))
        self.step = checkpoint.step
        return self.step


def in_worker_actor() -> bool:
    """Whether this process is a Ray Train worker actor; else the driver (launch=in_process) or no Ray at all."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def log_line(message: str) -> None:
    """One line to the driver's output. In a Ray Train worker actor, Ray Train routes print() to both the raw
    stream and its logger (the line shows twice): the root logger alone shows it once. In the driver itself
    (launch=in_process) the line is printed."""
    if in_worker_actor():
        logging.getLogger().info(message)
    else:
        print(message, flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs on each worker: loop_config = {config, resume_dir, tty}."""
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    from terarec.actors.monitoring import WorkerMetrics
    from terarec.kernels.comm import default_communicator

    started_at = time.time()
    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    # a worker actor sees only the GPU Ray gave it (none without use_gpu); the driver (launch=in_process) sees
    # every GPU, so it follows the job's use_gpu itself
    on_gpu = torch.cuda.is_available() and loop_config.get("use_gpu", True)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if on_gpu else torch.device("cpu")
    comm = default_communicator() if context.get_world_size() > 1 else LocalCommunicator()
    cpus = (ray.get_runtime_context().get_assigned_resources().get("CPU") if in_worker_actor()
            else loop_config.get("cpus"))
    worker = TrainWorker(config, comm, device, reader_threads=max(1, int(cpus)) if cpus else None)
    built_at = time.time()
    rank = worker.rank

    def startup() -> dict[str, float]:
        """Where the time to the first step went, in seconds (metrics.json's `startup_s`)."""
        ray_ready_at = loop_config.get("ray_ready_at", loop_config["launched_at"])
        return {"driver_and_ray": ray_ready_at - loop_config["launched_at"], "train_workers": started_at - ray_ready_at,
                "build": built_at - started_at,
                "first_batch": worker.first_batch_at - built_at, "first_step": worker.first_step_at - worker.first_batch_at}

    checkpoint = ray.train.get_checkpoint()
    resume_dir = loop_config.get("resume_dir")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            worker.restore(directory)
        log_line(f"[terarec] rank {rank}/{worker.world_size}: restored step {worker.step} after a restart")
    elif resume_dir:
        worker.restore(resume_dir)
        log_line(f"[terarec] rank {rank}/{worker.world_size}: resumed from {resume_dir} at step {worker.step}")

    monitor = WorkerMetrics(rank)
    # A bar on a terminal; plain log lines where the driver's output goes to a file or a pipe.
    progress = tqdm(total=worker.total_steps, desc="train") if rank == 0 and loop_config.get("tty") else None
    if progress is not None:
        progress.update(worker.step)
    shown_step, first_window = worker.step, True
    curve_path = os.path.join(config.run_dir, "curve.jsonl")

    def on_log(log: StepLog) -> None:
        nonlocal shown_step, first_window
        if rank == 0 and first_window:
            parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in startup().items())
            log_line(f"[terarec] first step {worker.first_step_at - loop_config['launched_at']:.1f} s after launch "
                     f"({parts})")
            first_window = False
        monitor.record(log, worker.store)
        if rank == 0:
            line = f"train loss {log.loss:.4f} | {log.samples_per_s:,.0f} samples/s"
            if progress is not None:
                progress.update(log.step - shown_step)
                shown_step = log.step
                progress.set_description(line)
            else:
                log_line(f"[terarec] step {log.step}/{worker.total_steps} | {line} | exchange {log.exchange_mb:.1f} MB "
                         f"{log.exchange_s * 1e3:.0f} ms")
            with open(curve_path, "a") as stream:
                stream.write(json.dumps(log.__dict__) + "\n")

    def on_eval(step: int, metrics: dict[str, float], is_best: bool) -> None:
        monitor.record_eval(metrics)
        if rank == 0:
            figures = " | ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name != "eval_rows")
            log_line(f"[terarec] eval at step {step}: {figures}" + (" (best so far)" if is_best else ""))
            with open(curve_path, "a") as stream:
                stream.write(json.dumps({"step": step, **metrics, "is_best": is_best}) + "\n")

    def on_checkpoint(step: int, final: bool) -> None:
        metrics = {"step": step, "world_size": worker.world_size}
        if final:
            metrics |= worker.final_metrics()
            if worker.first_step_at is not None:
                metrics["time_to_first_step_s"] = worker.first_step_at - loop_config["launched_at"]
                metrics["startup_s"] = startup()
        root = loop_config.get("checkpoint_root")
        if root is None:  # Ray Train's workers: it copies the reported directory into the run's storage
            with tempfile.TemporaryDirectory() as directory:
                worker.save(directory)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            return
        # in process (Ray Train's local mode keeps only a reference): written where Ray Train would put it
        directory = os.path.join(root, f"checkpoint_{step:09d}")
        os.makedirs(directory, exist_ok=True)
        worker.save(directory)
        for old in sorted(glob.glob(os.path.join(root, "checkpoint_*")))[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    if worker.step >= worker.total_steps:
        on_checkpoint(worker.step, True)
    else:
        worker.train(on_log=on_log, on_checkpoint=on_checkpoint, on_eval=on_eval)
    if progress is not None:
        progress.close()
