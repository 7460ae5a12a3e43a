"""The sharded step on paper (core/cost_model.py), fed with measurements and checked where it can run.

Modes (each writes JSON to bench/results/; the last one reads them all):

    python bench/scale_model.py --measure-gpu             # one GPU, DLRM shapes: writes scale_model-inputs-<device>.json
    python bench/scale_model.py --measure-wire            # CPU, 2 and 4 gloo processes: bytes per step vs batch and Zipf skew
    python bench/scale_model.py --validate-cpu            # CPU, 2/3/4 gloo processes: predicted vs measured exchange and step
    python bench/scale_model.py                           # predictions 1..512 GPUs, tables, plot, scale_model.json

Components are timed on the real code: a `TrainWorker` (workers=1) steps with its store as the row backend
(the whole one-device step), with `ServedRows` (the step without the store: the Embedding front and the dense
model), the store's lookup + update alone, `ShardedRows` over a world of one (its routing work) and
encode + decode per wire format. Batches are cycled after a warm-up pass (a warm table, as in embedding_gpu.py).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import itertools
import json
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from results import RESULTS, device_name, record  # bench/results.py
from store import ZipfIds  # bench/store.py
from timing import median_ms  # bench/timing.py
from terarec.actors.train_worker import TrainWorker
from terarec.core.config import load_config
from terarec.core.cost_model import (KEY_BYTES, LINK_EFFICIENCY, WIRES, DeviceCosts, Fabric, KeyDistribution, Link,
                                     all_to_all_terms, bytes_sent_per_step, fabric_for, predict_step,
                                     slowest_worker_wait_ms, wire_row_bytes)
from terarec.core.data.reader import BatchReader
from terarec.core.data.synth import ZIPF_EXPONENT, cardinalities_for, write_synthetic
from terarec.kernels.comm import Communicator, GlooCommunicator, LocalCommunicator
from terarec.kernels.quant import decode_rows, encode_rows
from terarec.store import DeviceStore, SparseSGD, feature_keys
from terarec.store.base import Lookup
from terarec.store.sharded import ShardedRows

GPU_SHAPE = {"batch": 65536, "dim": 128, "bottom": [512, 256], "top": [1024, 1024, 512, 256]}  # bench/README.md
CPU_SHAPE = {"batch": 6144, "dim": 16, "bottom": [64], "top": [256, 128]}  # the default DLRM; 6144 splits over 2, 3, 4
WORLDS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SCENARIOS = [("pcie4", "eth100"), ("pcie4", "ib400"), ("nvlink4", "eth100"), ("nvlink4", "ib400")]
ONEFLOW = {"gpus": 4, "global_batch": 55296, "fp32_gain": 0.64, "amp_gain": 0.13}  # 4 x A100 over PCIe, OneFlow's article


# ---- measured on one device ------------------------------------------------------------------------------

class ServedRows:
    """A row backend that serves every lookup from one tensor and drops the updates: the step without the store."""

    def __init__(self, dim: int, device: torch.device, capacity: int):
        self.dim = dim
        self.rows = torch.randn(capacity, dim, device=device) * 0.01

    def lookup(self, keys: torch.Tensor, insert: bool = True) -> torch.Tensor:
        return self.rows[: keys.numel()]

    def lookup_for_update(self, keys: torch.Tensor) -> Lookup:
        return Lookup(keys, self.lookup(keys))

    def update(self, lookup: Lookup, grads: torch.Tensor) -> None:
        pass


def job(data: str, shape: dict, workers: int, wire: str = "fp32", optimizer: str = "adagrad"):
    overrides = [f"embedding.dim={shape['dim']}", f"embedding.optimizer={optimizer}", f"embedding.comm_dtype={wire}",
                 f"embedding.grad_comm_dtype={wire}", f"dlrm.bottom_mlp={shape['bottom']}", f"dlrm.top_mlp={shape['top']}"]
    return load_config(overrides=overrides, flags={"data": data, "model": "dlrm", "batch_size": shape["batch"],
                                                    "workers": workers})


def read_batches(worker: TrainWorker, global_batch: int, count: int, rank: int = 0, world: int = 1) -> list:
    with BatchReader(worker.train_files, global_batch, rank=rank, world_size=world, shuffle=False) as reader:
        return [batch.to(worker.device) for batch in itertools.islice(reader, count)]


def cycle_steps(worker: TrainWorker, batches: list, precision: str):
    """One training step per call, on the next batch; bf16 runs the step under autocast."""
    batches = itertools.cycle(batches)
    amp = (torch.autocast(worker.device.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())

    def step():
        with amp:
            worker.train_step(next(batches))
    return step


@contextlib.contextmanager
def row_backend(worker: TrainWorker, backend):
    embedding = worker.model.embedding
    saved, embedding.backend = embedding.backend, backend
    try:
        yield
    finally:
        embedding.backend = saved


def measure_device(worker: TrainWorker, batches: list, precisions: list[str], repeats: int) -> dict:
    """Component times of one device (see the module docstring) and the whole step, in ms."""
    device = worker.device
    keys = [torch.unique(feature_keys(batch.sparse)) for batch in batches]
    unique = int(np.mean([k.numel() for k in keys]))
    grads = torch.randn(max(k.numel() for k in keys), worker.store.dim, device=device) * 1e-3
    served = ServedRows(worker.store.dim, device, grads.shape[0])
    dense, step, failed = {}, {}, {}
    for precision in precisions:
        try:
            for backend, out in ((worker.store, step), (served, dense)):
                with row_backend(worker, backend):
                    out[precision] = median_ms(cycle_steps(worker, batches, precision), iters=repeats, device=device)
        except Exception as error:  # noqa: BLE001 (a kernel without bf16 must not cost the fp32 figures)
            failed[precision] = f"{type(error).__name__}: {error}"[:500]
            dense.pop(precision, None)
            step.pop(precision, None)
    key_cycle = itertools.cycle(keys)

    def lookup_update(rows):
        def run():
            k = next(key_cycle)
            rows.update(rows.lookup_for_update(k), grads[: k.numel()])
        return run
    store_ms = median_ms(lookup_update(worker.store), iters=repeats, device=device)
    sharded_ms = median_ms(lookup_update(worker.rows), iters=repeats, device=device)  # ShardedRows over a world of one
    rows = torch.randn(unique, worker.store.dim, device=device)
    codec = {wire: 2 * median_ms(lambda: decode_rows(encode_rows(rows, wire), wire, rows.shape[1]), iters=repeats,
                                   device=device)
             for wire in WIRES}  # rows out and gradients back
    codec = {wire: ms - codec["fp32"] for wire, ms in codec.items()}  # fp32 is the store's own format
    costs = DeviceCosts(device_name(), batches[0].dense.shape[0], worker.store.dim, unique,
                        sum(p.numel() for p in worker.dense_params), dense, store_ms, max(0.0, sharded_ms - store_ms),
                        codec)
    return {"costs": asdict(costs), "step_ms": step, "failed": failed}


def measure_gpu(args) -> None:
    """The one-GPU inputs at the DLRM shapes; without CUDA it runs on the CPU (a smoke run the report ignores)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(GPU_SHAPE, batch=args.batch)
    with tempfile.TemporaryDirectory() as data:
        write_synthetic(data, rows=shape["batch"] * (args.batches + 1), cardinality_scale=args.cardinality_scale)
        worker = TrainWorker(job(data, shape, 1), LocalCommunicator(), device)
        batches = read_batches(worker, shape["batch"], args.batches)
    measured = measure_device(worker, batches, ["fp32", "bf16"], args.repeats)
    slug = device_name().lower().replace("nvidia ", "").replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
    record(f"scale_model-inputs-{slug}", measured, dict(shape, cardinality_scale=args.cardinality_scale,
                                                        batches=args.batches, repeats=args.repeats, tf32=True))
    print(json.dumps(measured, indent=1))


# ---- measured over gloo processes ----------------------------------------------------------------------------

EXCHANGE_PARTS = ("keys", "rows", "grads")  # a training step's all-to-alls, in order (device store: no prefetch)


class CountingCommunicator(Communicator):
    """Passes every collective to `inner`; counts the bytes each all-to-all sends to this worker and to the others,
    and times each collective by part (`seconds`): the count exchange of every all-to-all ("counts"), the payload of
    the keys, rows and gradients (named by their order in a step), the dense all-reduce ("all_reduce");
    `spans` holds each all-to-all's (start, end) on the host clock. `probe`, if given, is called at the start of
    each all-to-all (inside its span).

    With `synchronize`, a barrier before each collective takes the wait for the slowest worker out of it (the
    model has that wait as a term of its own); its seconds are the part "barrier"."""

    def __init__(self, inner: Communicator, synchronize: bool = False, probe=None):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.synchronize = synchronize
        self.probe = probe
        self.to_self = self.to_peers = 0
        self.seconds: collections.Counter = collections.Counter()
        self.spans: list[tuple[float, float]] = []
        self.calls = 0
        exchange_counts = inner.exchange_counts

        def timed_exchange_counts(send_counts):  # inner.all_to_all calls it first: the counts' share of the call
            with self.timed("counts"):
                return exchange_counts(send_counts)
        inner.exchange_counts = timed_exchange_counts

    @contextlib.contextmanager
    def timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - started

    def reset(self) -> None:
        self.to_self = self.to_peers = self.calls = 0
        self.seconds.clear()
        self.spans.clear()

    def wait_for_all(self) -> None:
        if self.synchronize:
            with self.timed("barrier"):
                dist.barrier()

    def all_to_all(self, send, send_counts):
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        own = send_counts[self.rank] * row_bytes
        self.to_self += own
        self.to_peers += sum(send_counts) * row_bytes - own
        part = EXCHANGE_PARTS[self.calls % len(EXCHANGE_PARTS)]
        self.calls += 1
        self.wait_for_all()
        counts_before = self.seconds["counts"]
        started = time.perf_counter()
        if self.probe is not None:
            self.probe()
        with self.timed(part):
            received = self.inner.all_to_all(send, send_counts)
        self.spans.append((started, time.perf_counter()))
        self.seconds[part] -= self.seconds["counts"] - counts_before
        return received

    def all_reduce(self, tensor):
        self.wait_for_all()
        with self.timed("all_reduce"):
            return self.inner.all_reduce(tensor)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, world: int, *args) -> list:
    """Runs fn(rank, world, port, *args, out) in `world` gloo processes; returns their `out[rank]` in rank order."""
    out = mp.Manager().dict()
    mp.start_processes(fn, args=(world, free_port(), *args, out), nprocs=world, start_method="spawn")
    return [out[rank] for rank in range(world)]


def start_gloo(rank: int, world: int, port: int, threads: int, synchronize: bool = False) -> CountingCommunicator:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return CountingCommunicator(GlooCommunicator(), synchronize)


def wire_rank(rank: int, world: int, port: int, settings: dict, out) -> None:
    """Lookups and updates through `ShardedRows` for each (batch, Zipf exponent, wire); counters per step."""
    comm = start_gloo(rank, world, port, 1)
    rows_out = []
    for exponent in settings["exponents"]:
        ids = ZipfIds(settings["vocab"], exponent, torch.device("cpu"), seed=rank)
        for batch, wire in itertools.product(settings["batches"], WIRES):
            rows = ShardedRows(DeviceStore(settings["dim"], SparseSGD()), comm, 4096, wire, wire)
            comm.reset()
            keys = torch.unique(feature_keys(ids.batch(batch).sparse))
            rows.update(rows.lookup_for_update(keys), torch.randn(keys.numel(), settings["dim"]))
            cell = {"batch": batch, "zipf": exponent, "wire": wire, "unique_keys": keys.numel(),
                    "bytes_sent": rows.stats.bytes_sent, "to_self": comm.to_self, "to_peers": comm.to_peers,
                    "exchange_s": rows.stats.seconds, "exchange_parts_s": dict(comm.seconds),
                    "exchange_calls": comm.calls}
            cell["global_unique"] = torch.unique(torch.cat(comm.all_gather(keys))).numel()
            rows_out.append(cell)
    out[rank] = rows_out
    dist.destroy_process_group()


def measure_wire(args) -> None:
    settings = {"dim": args.dim, "vocab": args.vocab, "exponents": args.zipf, "batches": args.wire_batches}
    rows = []
    for world in args.wire_workers:
        per_rank = spawn(wire_rank, world, settings)
        for cells in zip(*per_rank):
            first = cells[0]
            unique = sum(c["unique_keys"] for c in cells)
            keys = KeyDistribution((args.vocab,) * 26, first["zipf"])
            rows.append({"workers": world, **{k: first[k] for k in ("batch", "zipf", "wire", "global_unique")},
                         "unique_keys_per_worker": unique / world,
                         "expected_unique_per_worker": keys.expected_unique(first["batch"]),
                         "bytes_sent_per_worker": sum(c["bytes_sent"] for c in cells) / world,
                         "counted_per_worker": sum(c["to_self"] + c["to_peers"] for c in cells) / world,
                         "model_bytes_per_worker": bytes_sent_per_step(unique / world, args.dim, first["wire"]),
                         "worst_worker_model_error": max(abs(bytes_sent_per_step(c["unique_keys"], args.dim, c["wire"])
                                                             / c["bytes_sent"] - 1) for c in cells),
                         "wire_bytes_per_worker": sum(c["to_peers"] for c in cells) / world,
                         "model_wire_bytes_per_worker": bytes_sent_per_step(unique / world, args.dim, first["wire"])
                         * (world - 1) / world})
    print("\n".join(wire_table(rows)))
    record("scale_model-wire", {"rows": rows}, settings | {"workers": args.wire_workers})


def wire_table(rows: list[dict]) -> list[str]:
    """One line per (workers, batch, Zipf): keys, and the bytes per worker per step by wire format."""
    lines = ["| workers | samples/worker | Zipf | unique keys/worker (closed form) | per owner after merging | "
             "MB sent/worker fp32 / bf16 / int8 (ShardedRows counter) | model vs counter, worst worker | share to peers |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (world, batch, zipf), group in itertools.groupby(rows, key=lambda r: (r["workers"], r["batch"], r["zipf"])):
        cells = {r["wire"]: r for r in group}
        first = cells["fp32"]
        worst = max(r["worst_worker_model_error"] for r in cells.values())
        lines.append(f"| {world} | {batch} | {zipf} | {first['unique_keys_per_worker']:,.0f} "
                     f"({first['expected_unique_per_worker']:,.0f}) | {first['global_unique'] / world:,.0f} | "
                     + " / ".join(f"{cells[w]['bytes_sent_per_worker'] / 1e6:.2f}" for w in ("fp32", "bf16", "int8"))
                     + f" | {worst:.1%} | {first['wire_bytes_per_worker'] / first['bytes_sent_per_worker']:.1%} |")
    return lines


def fit_link(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds of latency, bytes/s) of a payload: least squares of the relative error over (bytes to the peers,
    seconds) points (in absolute terms the small payloads would count for nothing)."""
    x, y = np.array(points, dtype=float).T
    per_byte, fixed = np.polyfit(x, y, 1, w=1 / y)
    return max(float(fixed), 0.0), 1.0 / max(float(per_byte), 1e-12)


def validation_round(alone: TrainWorker, alone_batches: list, step, comm: CountingCommunicator, sizes: list[int],
                     turns: int) -> dict:
    """One round of `turns` turns, each taking every measurement once, so that all of them meet the same load (on
    a shared machine it moves within seconds; measured one after the other, a component and the steps saw
    different machines). A turn, on every rank:

    - the one-worker trainer's step through `ShardedRows` over a world of one: the compute between the step's
      all-to-alls, where a sharded step waits for the other workers; at each of those points, where a step
      issues its all-to-alls, a probe: a barrier, then one gloo all-to-all of a size taken in turn from `sizes`
      (the link as a step meets it: on a shared CPU a process wakes from a blocking receive later the longer it
      computed before; calls back to back were 2-4x faster), the count exchange (a few bytes) timed apart from
      the payload;
    - the components: that trainer's step without the store (`ServedRows`), the store's lookup + update, the
      same through its own `ShardedRows` over a world of one (the routing; no probes);
    - a real step with a barrier before each collective (the exchange by part, the wait taken out: "barrier"),
      then a real step as built.

    Means over the turns (a run pays every call, bursts included); the link's over the workers too. The first
    turn is a warm-up."""
    world, dim = comm.world_size, alone.store.dim
    keys = [torch.unique(feature_keys(batch.sparse)) for batch in alone_batches]
    grads = torch.randn(max(k.numel() for k in keys), dim) * 1e-3
    served = ServedRows(dim, torch.device("cpu"), grads.shape[0])
    recording, turn = False, 0
    alone_step = cycle_steps(alone, alone_batches, "fp32")
    link_sums = torch.zeros(2, len(sizes) + 1, dtype=torch.float64)  # seconds and calls per size, then the counts
    segments, samples, parts = [], collections.defaultdict(list), collections.Counter()

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - started)

    def probe() -> None:  # every size at every point of the step over the turns
        size = (turn + alone_comm.calls) % len(sizes)
        payload = torch.zeros(max(1, sizes[size] // 4 // world) * world)
        dist.barrier()
        comm.reset()
        seconds = timed(lambda: comm.inner.all_to_all(payload, [payload.numel() // world] * world)) / 1e3
        if recording:
            link_sums[:, size] += torch.tensor([seconds - comm.seconds["counts"], 1.0], dtype=torch.float64)
            link_sums[:, -1] += torch.tensor([comm.seconds["counts"], 1.0], dtype=torch.float64)

    alone_comm = CountingCommunicator(LocalCommunicator(), probe=probe)
    sharded = ShardedRows(alone.store, alone_comm, alone.config.embedding.num_buckets)
    for turn in range(turns + 1):
        recording = turn > 0
        k = keys[turn % len(keys)]
        with row_backend(alone, sharded):
            alone_comm.reset()
            started = time.perf_counter()
            alone_step()
            ended = time.perf_counter()
        (keys_start, keys_end), (rows_start, rows_end), (grads_start, grads_end) = alone_comm.spans
        # the updates and the forward up to its unique keys; the owner's store lookup; forward and backward
        segment = [1e3 * (keys_start - started + ended - grads_end), 1e3 * (rows_start - keys_end),
                   1e3 * (grads_start - rows_end)]
        with row_backend(alone, served):
            dense_ms = timed(alone_step)
        store_ms = timed(lambda: alone.store.update(alone.store.lookup_for_update(k), grads[: k.numel()]))
        sharded_ms = timed(lambda: alone.rows.update(alone.rows.lookup_for_update(k), grads[: k.numel()]))
        comm.reset()
        comm.synchronize = True
        synchronized_ms = timed(step)
        comm.synchronize = False
        turn_parts = dict(comm.seconds, bytes_sent=comm.to_self + comm.to_peers, wire_bytes=comm.to_peers)
        as_built_ms = timed(step)
        if recording:
            segments.append(segment)
            for name, ms in (("dense", dense_ms), ("store", store_ms), ("sharded", sharded_ms),
                             ("synchronized_step", synchronized_ms), ("step", as_built_ms)):
                samples[name].append(ms)
            parts.update(turn_parts)
    comm.inner.all_reduce(link_sums)
    seconds, counted = link_sums.tolist()
    points = [(max(1, n // 4 // world) * 4 * (world - 1), total / count)
              for n, total, count in zip(sizes, seconds, counted) if count]
    latency, bandwidth = fit_link(points)
    mean = {name: statistics.fmean(values) for name, values in samples.items()}
    unique = int(np.mean([k.numel() for k in keys]))
    costs = DeviceCosts(device_name(), alone_batches[0].dense.shape[0], dim, unique,
                        sum(p.numel() for p in alone.dense_params), {"fp32": mean["dense"]}, mean["store"],
                        max(0.0, mean["sharded"] - mean["store"]), {"fp32": 0.0})
    return {"costs": asdict(costs), "segments_ms": segments, "step_ms": mean["step"],
            "step_ms_each": samples["step"],
            "synchronized_step_ms": mean["synchronized_step"],
            "parts_ms": {part: 1e3 * seconds / turns for part, seconds in parts.items() if not part.endswith("bytes")},
            "bytes_sent": parts["bytes_sent"] / turns, "wire_bytes": parts["wire_bytes"] / turns,
            "link": {"count_latency_s": seconds[-1] / counted[-1], "latency_s": latency,
                     "bytes_per_s": bandwidth, "points": points}}


def cpu_busy_s() -> float:
    """CPU seconds every process of the machine has used since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stream:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stream.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def validate_rank(rank: int, world: int, port: int, data: str, settings: dict, out) -> None:
    """On every rank at once, so that all see the same load: `validation_round`s on a one-worker TrainWorker of
    the same per-worker batch and a TrainWorker of `world` workers over gloo, with the machine's load of each."""
    comm = start_gloo(rank, world, port, settings["threads"])
    shape, cpu = settings["shape"], torch.device("cpu")
    alone = TrainWorker(job(data, dict(shape, batch=shape["batch"] // world), 1), LocalCommunicator(), cpu)
    alone_batches = read_batches(alone, shape["batch"] // world, settings["batches"])
    worker = TrainWorker(job(data, shape, world), comm, cpu)
    batches = read_batches(worker, shape["batch"], settings["batches"], rank, world)
    keys = [torch.unique(feature_keys(batch.sparse)) for batch in batches]
    owned = np.mean([torch.unique(torch.cat(comm.inner.all_gather(k))).numel() / world for k in keys])
    step = cycle_steps(worker, batches, "fp32")
    for _ in batches:
        step()
    rounds = []
    for _ in range(settings["rounds"]):
        dist.barrier()
        started, cpu_started, busy_started = time.perf_counter(), time.process_time(), cpu_busy_s()
        measured = validation_round(alone, alone_batches, step, comm, settings["link_sizes"], settings["turns"])
        dist.barrier()
        rounds.append(measured | {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
                                  "machine_busy_s": cpu_busy_s() - busy_started, "load_average": os.getloadavg()})
    out[rank] = {"rounds": rounds, "unique_keys": float(np.mean([k.numel() for k in keys])), "owned_keys": float(owned)}
    dist.destroy_process_group()


def mean_costs(costs: list[dict]) -> DeviceCosts:
    """Every rank's component times, averaged."""
    first = DeviceCosts(**costs[0])
    return replace(first, unique_keys=round(np.mean([c["unique_keys"] for c in costs])),
                   store_ms=float(np.mean([c["store_ms"] for c in costs])),
                   pack_ms=float(np.mean([c["pack_ms"] for c in costs])),
                   dense_ms={p: float(np.mean([c["dense_ms"][p] for c in costs])) for p in first.dense_ms},
                   codec_ms={w: float(np.mean([c["codec_ms"][w] for c in costs])) for w in first.codec_ms})


def exchange_parts_ms(unique_keys: float, dim: int, world: int, fabric: Fabric, wire: str = "fp32") -> dict[str, float]:
    """The model's exchange by the parts `CountingCommunicator` times: three count exchanges, then the payloads
    of keys, rows and gradients (a latency and their bytes each)."""
    parts = {"counts": 0.0}
    for part, row_bytes in zip(EXCHANGE_PARTS, (KEY_BYTES, wire_row_bytes(wire, dim), wire_row_bytes(wire, dim))):
        counts, latency, transfer = all_to_all_terms(unique_keys * row_bytes, world, fabric)
        parts["counts"] += counts
        parts[part] = latency + transfer
    return {part: 1e3 * seconds for part, seconds in parts.items()}


EXCHANGE_MEASURED = ("counts", *EXCHANGE_PARTS)


def validation_row(world: int, run: int, index: int, cells: list[dict], unique: float, owned: float, dim: int,
                   cores: int, threads: int) -> dict:
    """One round of one worker count: the model on that round's inputs against that round's steps.

    The wait for the slowest worker is charged only where every worker has a core of its own: where the workers
    and the machine's other processes (measured over the round) ask for more cores than there are, a worker that
    waits gives its core to the others, and the compute measured with all workers at once already ran at that
    shared speed. Both predictions are kept."""
    mean = lambda values: float(np.mean(list(values)))  # noqa: E731 (over the workers)
    link = cells[0]["link"]  # the probes' sums were all-reduced: every worker holds the mean
    gloo = Link("gloo over loopback, probed where a step calls", link["bytes_per_s"] / 1e9, link["latency_s"] * 1e6,
                count_latency_us=link["count_latency_s"] * 1e6)
    fabric = Fabric(gloo, gloo, gpus_per_node=world, efficiency=1.0)
    costs = mean_costs([c["costs"] for c in cells])
    wait = slowest_worker_wait_ms([c["segments_ms"] for c in cells])
    wall = mean(c["wall_s"] for c in cells)
    ours = sum(c["cpu_s"] for c in cells) / wall
    others = cells[0]["machine_busy_s"] / wall - ours
    shared = world * threads + others > cores
    dedicated = predict_step(costs, None, world, fabric, unique_keys=unique, owned_keys=owned, wait_ms=wait)
    predicted = dict(dedicated.ms, step_dedicated_cores=dedicated.ms["step"],
                     step_shared_cores=dedicated.ms["step"] - dedicated.ms["wait"],
                     compute=sum(dedicated.ms[k] for k in ("dense", "store", "pack", "codec")))
    predicted["step"] = predicted["step_shared_cores" if shared else "step_dedicated_cores"]
    synchronized = [c["parts_ms"] for c in cells]
    measured = {
        "exchange": mean(sum(parts.get(p, 0.0) for p in EXCHANGE_MEASURED) for parts in synchronized),
        "all_reduce": mean(parts["all_reduce"] for parts in synchronized),
        "wait": mean(parts["barrier"] for parts in synchronized),
        "step": mean(c["step_ms"] for c in cells),
        "compute": mean(np.sum(c["segments_ms"], axis=1).mean() for c in cells)}
    return {"workers": world, "run": run, "round": index, "cores": cores, "threads_per_worker": threads,
            "cores_shared": shared, "unique_keys": unique, "owned_keys": owned,
            "bytes_sent_measured": mean(c["bytes_sent"] for c in cells),
            "bytes_sent_model": bytes_sent_per_step(unique, dim, "fp32"),
            "wire_bytes_measured": mean(c["wire_bytes"] for c in cells),
            "link": {"count_latency_us": gloo.counts_us, "latency_us": gloo.latency_us, "gbs": gloo.gbs,
                     "points": link["points"]},
            "costs": asdict(costs), "wait_ms": wait, "measured_ms": measured, "predicted_ms": predicted,
            "parts_ms": {"measured": {p: mean(parts.get(p, 0.0) for parts in synchronized) for p in EXCHANGE_MEASURED},
                         "predicted": exchange_parts_ms(unique, dim, world, fabric)},
            "errors": {what: predicted[what] / measured[what] - 1
                       for what in ("exchange", "all_reduce", "wait", "compute", "step")}
            | {f"step_{kind}_cores": predicted[f"step_{kind}_cores"] / measured["step"] - 1
               for kind in ("shared", "dedicated")},
            "step_ms_each": [c["step_ms_each"] for c in cells],
            "synchronized_step_ms": mean(c["synchronized_step_ms"] for c in cells),
            "machine": {"load_average": cells[0]["load_average"], "wall_s": wall, "our_cores": ours,
                        "others_cores": others}}


def validate_cpu(args) -> None:
    """Runs of every worker count in turn (so that each count meets the machine's load at several times), rounds
    in each: the prediction from a round's inputs against that round's steps."""
    cores = os.cpu_count() or 1
    shape = dict(CPU_SHAPE, batch=args.cpu_batch)
    rows = []
    with tempfile.TemporaryDirectory() as data:
        write_synthetic(data, rows=shape["batch"] * (args.batches + 1), cardinality_scale=args.cardinality_scale)
        for run, world in itertools.product(range(args.runs), args.workers):
            threads = max(1, cores // world)
            settings = {"threads": threads, "shape": shape, "batches": args.batches, "turns": args.turns,
                        "link_sizes": args.link_sizes, "rounds": args.rounds}
            ranks = spawn(validate_rank, world, data, settings)
            unique, owned = (float(np.mean([r[k] for r in ranks])) for k in ("unique_keys", "owned_keys"))
            for index, cells in enumerate(zip(*(r["rounds"] for r in ranks))):
                rows.append(validation_row(world, run, index, list(cells), unique, owned, shape["dim"], cores, threads))
                print(json.dumps({k: rows[-1][k] for k in ("workers", "run", "round", "cores_shared", "measured_ms",
                                                           "predicted_ms", "errors", "link", "machine")}), flush=True)
    record("scale_model-validate-cpu", {"rows": rows},
           dict(shape=shape, batches=args.batches, turns=args.turns, rounds=args.rounds, runs=args.runs,
                link_sizes=args.link_sizes, cardinality_scale=args.cardinality_scale))


# ---- what it says -------------------------------------------------------------------------------------------

def read_result(pattern: str, skip: str | None = None) -> dict | None:
    """The newest result file matching `pattern` (whose name does not contain `skip`)."""
    paths = sorted((p for p in glob.glob(os.path.join(RESULTS, pattern)) if not (skip and skip in os.path.basename(p))),
                   key=os.path.getmtime)
    if not paths:
        return None
    with open(paths[-1]) as stream:
        return json.load(stream)


def gpu_inputs() -> tuple[DeviceCosts, dict]:
    """The latest --measure-gpu run if there is one, else placeholders from the H100 results of the other benches."""
    measured = read_result("scale_model-inputs-*.json", skip="cpu")
    if measured:
        origin = {k: measured[k] for k in ("device", "date", "commit", "settings")}
        return DeviceCosts(**measured["figures"]["costs"]), origin | {"step_ms": measured["figures"]["step_ms"]}
    embedding = read_result("embedding_gpu-h100*.json")
    exchange = {(r["wire"], r["samples"]): r for r in read_result("exchange_gpu-1gpu.json")["figures"]["rows"]}
    ms = {r["what"]: r["triton_ms"] for r in embedding["figures"]["rows"]}
    unique = embedding["figures"]["rows"][0]["keys"]
    int8, bf16 = exchange["int8", 65536], exchange["bf16", 65536]
    per_key = 1 / int8["rows"]  # the exchange bench moved 65536 x 26 rows
    store_ms = ms["store.update (SparseSGD), encode included"] + ms["encoder find_or_insert, unique keys, warm"]
    cast_ms = 2 * (bf16["exchange_ms"] - bf16["all_to_all_ms"]) * unique * per_key
    # ShardedRows' routing: 4 passes over the rows (1.6 TB/s gather, ARCHITECTURE.md) and 2 key sorts
    # (torch.unique of 1.7M keys: 0.46 ms, bench/README.md)
    pack_ms = 4 * unique * 128 * 4 * 2 / 1.6e9 + 2 * 0.46 * unique * per_key
    step = embedding["figures"]["dlrm_step"]["fused_ms"]
    costs = DeviceCosts(embedding["device"], 65536, 128, unique, dlrm_dense_params(GPU_SHAPE), {"fp32": step - store_ms},
                        store_ms, pack_ms, {"fp32": 0.0, "bf16": cast_ms, "fp16": cast_ms,
                                            "int8": 2 * (int8["quantize_ms"] + int8["dequantize_ms"]) * unique * per_key},
                        source="PLACEHOLDER until --measure-gpu runs: H100 results of embedding_gpu.py and "
                               "exchange_gpu.py (1 GPU); dense = fused step - store; pack estimated from gather and "
                               "sort rates; bf16 dense not measured")
    return costs, {k: embedding[k] for k in ("device", "date", "commit")} | {"step_ms": {"fp32": step}}


def dlrm_dense_params(shape: dict) -> int:
    from terarec.models import DLRM, DLRMConfig, Embedding
    model = DLRM(Embedding(DeviceStore(shape["dim"], SparseSGD())), 13, 26,
                 DLRMConfig(bottom_mlp=shape["bottom"], top_mlp=shape["top"]))
    return sum(p.numel() for p in model.parameters())


def criteo_keys() -> KeyDistribution:
    """Criteo Kaggle's 26 cardinalities with the synthetic data's Zipf exponent (core/data/synth.py)."""
    return KeyDistribution(tuple(cardinalities_for(1.0)), ZIPF_EXPONENT)


def scaling_table(costs: DeviceCosts, keys: KeyDistribution, precisions: list[str], overlap: bool) -> list[dict]:
    rows = []
    for (intra, inter), precision, wire in itertools.product(SCENARIOS, precisions, ("fp32", "bf16", "int8")):
        fabric = fabric_for(inter, intra)
        one = predict_step(costs, keys, 1, fabric, wire, precision, overlap).samples_per_s_per_gpu
        for world in WORLDS:
            p = predict_step(costs, keys, world, fabric, wire, precision, overlap)
            rows.append({"intra": intra, "inter": inter, "precision": precision, "wire": wire, "overlap": overlap,
                         "gpus": world, "samples_per_s_per_gpu": p.samples_per_s_per_gpu,
                         "efficiency": p.samples_per_s_per_gpu / one, "unique_keys": p.unique_keys,
                         "owned_keys": p.owned_keys, "wire_mb": p.wire_bytes / 1e6, "ms": p.ms})
    return rows


def oneflow_setting(costs: DeviceCosts, keys: KeyDistribution, precisions: list[str]) -> list[dict]:
    """int8 over fp32 on 4 GPUs over PCIe 4, OneFlow's setting, at its DLRM batch (55296 global)."""
    local = costs.scaled(ONEFLOW["global_batch"] // ONEFLOW["gpus"], costs.dim, costs.dense_params)
    fabric = fabric_for("pcie4")
    rows = []
    for precision, overlap in itertools.product(precisions, (False, True)):
        speed = {w: predict_step(local, keys, ONEFLOW["gpus"], fabric, w, precision, overlap) for w in WIRES}
        rows.append({"precision": precision, "overlap": overlap, "batch_per_gpu": local.batch,
                     "int8_gain": speed["int8"].samples_per_s_per_gpu / speed["fp32"].samples_per_s_per_gpu - 1,
                     "bf16_gain": speed["bf16"].samples_per_s_per_gpu / speed["fp32"].samples_per_s_per_gpu - 1,
                     "oneflow_gain": ONEFLOW["fp32_gain" if precision == "fp32" else "amp_gain"],
                     "ms": {w: p.ms for w, p in speed.items()}})
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(4 * len(SCENARIOS), 3.6), sharey=True)
    for ax, (intra, inter) in zip(axes, SCENARIOS):
        for wire, style in (("fp32", "-"), ("bf16", "--"), ("int8", ":")):
            cells = [r for r in rows if (r["intra"], r["inter"], r["wire"], r["precision"]) == (intra, inter, wire, "fp32")]
            ax.plot([r["gpus"] for r in cells], [r["samples_per_s_per_gpu"] / 1e6 for r in cells], style, label=f"{wire} wire")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{intra} in node, {inter} between", fontsize=9)
        ax.set_xlabel("GPUs (8 a node)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("M samples/s per GPU (predicted)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def markdown(origin: dict, costs: DeviceCosts, table: list[dict], oneflow: list[dict], validation: dict | None,
             one_gpu: dict, wire_bytes: dict | None) -> str:
    lines = [f"Inputs: {costs.device} ({origin.get('date')}, commit {origin.get('commit')}); {costs.source}. "
             f"Per GPU: batch {costs.batch}, dim {costs.dim}, DLRM dense {costs.dense_params:,} parameters; keys: "
             f"Criteo Kaggle cardinalities, Zipf(1.1) per feature (closed form); links at {LINK_EFFICIENCY:.0%} of spec; "
             "exchange not overlapped (as built).", "",
             "| link (node / network) | wire | " + " | ".join(f"{w} GPUs" for w in WORLDS) + " |",
             "| --- | --- |" + " ---: |" * len(WORLDS)]
    for (intra, inter), wire in itertools.product(SCENARIOS, ("fp32", "bf16", "int8")):
        cells = [r for r in table if (r["intra"], r["inter"], r["wire"], r["precision"]) == (intra, inter, wire, "fp32")]
        lines.append(f"| {intra} / {inter} | {wire} | " + " | ".join(
            f"{r['samples_per_s_per_gpu'] / 1e6:.2f}M ({r['efficiency']:.0%})" for r in cells) + " |")
    keys = {r["gpus"]: r for r in table if r["intra"] == "nvlink4" and r["inter"] == "ib400" and r["wire"] == "fp32"}
    lines += ["", f"Unique keys per GPU batch: {keys[1]['unique_keys']:,.0f}; keys an owner serves after merging: "
              + ", ".join(f"{keys[n]['owned_keys']:,.0f} at {n} GPUs" for n in (8, 64, 512)) + "."]
    if wire_bytes:
        lines += ["", f"Bytes per step over gloo ({wire_bytes['device']}, {wire_bytes['date'][:10]}, commit "
                  f"{wire_bytes['commit']}; dim {wire_bytes['settings']['dim']}, {wire_bytes['settings']['vocab']:,} "
                  "IDs per feature; one lookup + update per cell):", "", *wire_table(wire_bytes["figures"]["rows"])]
    lines += ["", "OneFlow's setting (4 GPUs over PCIe 4, 13824 samples per GPU): int8 wire over fp32, end to end",
              "", "| precision | exchange overlapped | int8 vs fp32 | bf16 vs fp32 | OneFlow reports |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['precision']} | {'yes' if r['overlap'] else 'no'} | {r['int8_gain']:+.0%} | {r['bf16_gain']:+.0%} | "
              f"{r['oneflow_gain']:+.0%} |" for r in oneflow]
    lines += ["", "Validation", "", "| where | what | predicted ms | measured ms | error |", "| --- | --- | ---: | ---: | ---: |"]
    for precision, measured in one_gpu["step_ms"].items():
        predicted = one_gpu["predicted"].get(precision)
        if predicted:
            lines.append(f"| 1 x {costs.device} | step, {precision} | {predicted:.2f} | {measured:.2f} | "
                         f"{predicted / measured - 1:+.1%} |")
    lines += cpu_validation_lines((validation or {}).get("rows", []))
    return "\n".join(lines)


def cpu_validation_lines(rows: list[dict]) -> list[str]:
    """Per worker count, over every round of every run: the measured exchange, all-reduce, wait, compute and step
    against the model (median and range of the rounds' errors), the machine's load, then the exchange by part."""
    if not rows:
        return []
    median = lambda values: float(np.median(list(values)))  # noqa: E731
    span = lambda values: f"{min(values):.1f} to {max(values):.1f}"  # noqa: E731
    titles = {"exchange": "exchange (a barrier before each call: no wait)", "all_reduce": "dense all-reduce (no wait)",
              "compute": "compute between the collectives", "wait": "wait for the slowest worker (barriers / model)",
              "step": "**step as built** (model: wait charged if cores are not shared)",
              "step_dedicated_cores": "step, model with the wait charged",
              "step_shared_cores": "step, model without the wait"}
    lines = ["", "CPU, gloo workers on 2 cores: error = predicted / measured - 1 per round (median, and the range over "
             "rounds and runs); ms are medians over rounds; load: the 1-minute load average, and the cores the "
             "machine's other processes used during the round:", "",
             "| workers | rounds | load (others' cores) | what | measured ms | predicted ms | error | error range |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    worlds = sorted({r["workers"] for r in rows})
    for world in worlds:
        rounds = [r for r in rows if r["workers"] == world]
        load = (span([r["machine"]["load_average"][0] for r in rounds])
                + f" ({span([r['machine']['others_cores'] for r in rounds])})")
        for what, title in titles.items():
            errors = [r["errors"][what] for r in rounds]
            measured = median(r["measured_ms"]["step" if what.startswith("step") else what] for r in rounds)
            lines.append(f"| {world} | {len(rounds)} | {load} | {title} | {measured:.1f} | "
                         f"{median(r['predicted_ms'][what] for r in rounds):.1f} | {median(errors):+.0%} | "
                         f"{min(errors):+.0%} to {max(errors):+.0%} |")
    lines += ["", "The model's inputs (medians over rounds) and the exchange by part, ms per step (measured: "
              "`CountingCommunicator`'s timers in the steps with barriers, mean over workers; the model's: the "
              "count exchange's latency, a latency + bytes / bandwidth per payload):", "",
              "| workers | link: count exchange µs / payload latency µs / MB/s | compute ms | wait ms | counts | keys | "
              "rows | grads |", "| ---: | --- | ---: | ---: | --- | --- | --- | --- |"]
    for world in worlds:
        rounds = [r for r in rows if r["workers"] == world]
        link = " / ".join(f"{median(r['link'][k] * scale for r in rounds):,.0f}"
                          for k, scale in (("count_latency_us", 1), ("latency_us", 1), ("gbs", 1e3)))
        parts = " | ".join(f"{median(r['parts_ms']['measured'][p] for r in rounds):.1f} vs "
                           f"{median(r['parts_ms']['predicted'][p] for r in rounds):.1f}" for p in EXCHANGE_MEASURED)
        lines.append(f"| {world} | {link} | {median(r['predicted_ms']['compute'] for r in rounds):.1f} | "
                     f"{median(r['wait_ms'] for r in rounds):.1f} | {parts} |")
    return lines


def report(args) -> None:
    costs, origin = gpu_inputs()
    keys = criteo_keys()
    precisions = [p for p in ("fp32", "bf16") if p in costs.dense_ms]
    table = scaling_table(costs, keys, precisions, overlap=False) + scaling_table(costs, keys, precisions, overlap=True)
    oneflow = oneflow_setting(costs, keys, precisions)
    measured = costs.source == "measured"  # placeholders predict their own step by construction: no check
    one_gpu = {"step_ms": origin.pop("step_ms"),
               "predicted": {p: predict_step(costs, None, 1, fabric_for("nvlink4"), precision=p,
                                             unique_keys=costs.unique_keys).ms["step"] for p in precisions if measured}}
    validation = read_result("scale_model-validate-cpu.json")
    wire = read_result("scale_model-wire.json")
    plot([r for r in table if not r["overlap"]], os.path.join(RESULTS, "scale_model.png"))
    text = markdown(origin, costs, [r for r in table if not r["overlap"]], oneflow,
                    validation and validation["figures"], one_gpu, wire)
    with open(os.path.join(RESULTS, "scale_model.md"), "w") as stream:
        stream.write(text + "\n")
    print(text)
    inputs = {"gpu": {"origin": origin, "costs": asdict(costs)},
              "wire_bytes": wire and {k: wire[k] for k in ("device", "date", "commit", "settings", "figures")},
              "key_distribution": {"cardinalities": list(keys.cardinalities), "zipf_exponent": keys.exponent}}
    validation_rows = {"one_gpu": one_gpu, "cpu_gloo": validation and {
        k: validation[k] for k in ("device", "date", "commit", "settings", "figures")}}
    record("scale_model", {"inputs": inputs, "validation": validation_rows, "predictions": table, "oneflow_setting": oneflow},
           {"worlds": WORLDS, "scenarios": SCENARIOS, "link_efficiency": LINK_EFFICIENCY})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--measure-gpu", action="store_true", help="time the components on this GPU (DLRM shapes)")
    mode.add_argument("--measure-wire", action="store_true", help="bytes per step over gloo vs batch and Zipf skew")
    mode.add_argument("--validate-cpu", action="store_true", help="predicted vs measured, 2/3/4 gloo workers")
    parser.add_argument("--batch", type=int, default=GPU_SHAPE["batch"], help="--measure-gpu: samples per step")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled after one warm-up pass")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure (medians)")
    parser.add_argument("--cardinality-scale", type=float, default=0.1, help="of the synthetic data (Kaggle x this)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4], help="--validate-cpu: worker counts")
    parser.add_argument("--runs", type=int, default=3, help="--validate-cpu: runs of every worker count, in turn")
    parser.add_argument("--rounds", type=int, default=1, help="--validate-cpu: rounds a run (one prediction each)")
    parser.add_argument("--turns", type=int, default=30, help="--validate-cpu: turns a round, each of every measurement")
    parser.add_argument("--cpu-batch", type=int, default=CPU_SHAPE["batch"], help="--validate-cpu: global batch")
    parser.add_argument("--link-sizes", type=int, nargs="+", default=[2**10, 2**18, 2**21],
                        help="--validate-cpu: all-to-all payloads (bytes per worker) for the link fit, from a few "
                             "messages' worth to above the step's")
    parser.add_argument("--wire-workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--wire-batches", type=int, nargs="+", default=[512, 2048, 8192], help="samples per worker")
    parser.add_argument("--zipf", type=float, nargs="+", default=[0.0, 1.05, 1.2], help="exponents (0: uniform)")
    parser.add_argument("--vocab", type=int, default=1_000_000, help="--measure-wire: IDs per feature")
    parser.add_argument("--dim", type=int, default=64, help="--measure-wire: row width")
    args = parser.parse_args()
    if args.measure_gpu:
        measure_gpu(args)
    elif args.measure_wire:
        measure_wire(args)
    elif args.validate_cpu:
        validate_cpu(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
