"""A cost model of the sharded training step: step time, samples/s per GPU and memory per GPU for N GPUs.

Every time in it comes from a measurement on one device (`DeviceCosts`, written by bench/scale_model.py)
scaled by counts the model derives (unique keys, bytes on the wire); links are parameters with presets
from public specs. One step of `TrainWorker.train_step` on each of N workers, per-worker batch b:

    compute  = dense(b) + store(u_owned) + [N > 1] (pack(u) + codec_wire(u))
    wait     = the wait for the slowest worker at the step's collectives (a measured input; 0 where not measured)
    exchange = all-to-all(8 u) + all-to-all(r u) + all-to-all(r u)       keys, rows, gradients
    reduce   = all-reduce(4 P)                                           dense gradients, fp32
    step     = compute + wait + exchange + reduce                  (as built)
             max(compute, exchange + reduce) + wait                (overlapped)

u is the unique keys of one worker's batch, u_owned = unique(N b) / N the keys an owner serves after the
rows of all workers are merged, r the bytes of one row on the wire (4D fp32, 2D bf16/fp16, D + 4 int8).
An all-to-all sends 1/N of its payload to itself, 7/N over the node's link and (N - 8)/N over the
network (8 GPUs a node); the two links run at once. Arithmetic only: no device, no Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from terarec.kernels.quant import SCALE_BYTES
from terarec.store.cache import METADATA_BYTES_PER_SLOT

WIRES = ("fp32", "bf16", "fp16", "int8")
KEY_BYTES = 8


@dataclass(frozen=True)
class Link:
    """One GPU's link: bandwidth per direction (GB/s) and the latency of one message (µs), as a step meets it:
    a call issued from compute (on a shared CPU, a process that computed wakes from a blocking receive later
    than one spinning in back-to-back calls; bench/scale_model.py --validate-cpu measures it so).

    `host_bus`: the GPU's PCIe link, which its traffic to the network also crosses. `count_latency_us`: the
    latency of the count exchange's message of a few bytes where it was measured apart from the payload's
    (bench/scale_model.py --validate-cpu); `latency_us` otherwise."""

    name: str
    gbs: float
    latency_us: float
    source: str = ""
    host_bus: bool = False
    count_latency_us: float | None = None

    @property
    def counts_us(self) -> float:
        return self.latency_us if self.count_latency_us is None else self.count_latency_us


# Public specs, one direction per GPU. `efficiency` in `Fabric` scales them to what a collective gets.
LINKS = {
    "pcie4": Link("PCIe 4.0 x16", 31.5, 5.0, "PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b",
                  host_bus=True),
    "nvlink4": Link("NVLink 4 (H100 SXM)", 450.0, 3.0, "NVIDIA H100 datasheet: 900 GB/s total, both directions"),
    "eth100": Link("100 GbE", 12.5, 10.0, "IEEE 802.3 100GBASE: 100 Gb/s; RoCE latency of order 10 µs"),
    "ib400": Link("InfiniBand NDR 400 Gb/s", 50.0, 5.0, "NVIDIA ConnectX-7 / Quantum-2: 400 Gb/s per port"),
}
NODE_LINKS = ("pcie4", "nvlink4")
LINK_EFFICIENCY = 0.8  # fraction of a link's spec rate a collective reaches (assumed, not measured)


@dataclass(frozen=True)
class Fabric:
    """The links of a cluster: `intra` between the GPUs of a node, `inter` per GPU to other nodes."""

    intra: Link
    inter: Link
    gpus_per_node: int = 8
    nics_per_node: int = 8  # one NIC per GPU, as in a DGX; fewer share the node's NICs
    efficiency: float = LINK_EFFICIENCY

    @property
    def name(self) -> str:
        return f"{self.intra.name} in a node, {self.inter.name} between nodes"

    def inter_gbs(self) -> float:
        return self.inter.gbs * min(1.0, self.nics_per_node / self.gpus_per_node)


def fabric_for(link: str, intra: str | None = None, **options) -> Fabric:
    """`link` names the node link (pcie4, nvlink4: then nodes talk over ib400) or the network (eth100, ib400:
    then the node link is `intra`, nvlink4 by default)."""
    for name in (link, intra):
        if name is not None and name not in LINKS:
            raise ValueError(f"unknown link {name!r}; choose one of {', '.join(LINKS)}")
    if link in NODE_LINKS:
        return Fabric(LINKS[link], LINKS["ib400"], **options)
    return Fabric(LINKS[intra or "nvlink4"], LINKS[link], **options)


def wire_row_bytes(wire: str, dim: int) -> int:
    """Bytes of one embedding row (or gradient) on the wire."""
    if wire == "int8":
        return dim + SCALE_BYTES
    if wire not in WIRES:
        raise ValueError(f"unknown wire format {wire!r}; choose one of {', '.join(WIRES)}")
    return dim * (4 if wire == "fp32" else 2)


def bytes_sent_per_step(unique_keys: float, dim: int, wire: str) -> float:
    """What one worker's `ShardedRows` counts per step (self included): its keys, the rows it serves back
    (as many as it receives keys, u on average over workers), its gradients."""
    return unique_keys * (KEY_BYTES + 2 * wire_row_bytes(wire, dim))


def all_to_all_seconds(payload_bytes: float, world: int, fabric: Fabric) -> float:
    """One variable-size all-to-all: the count exchange and the payload, each paying the slowest link's
    latency; the node's link and the network move their shares at once (over PCIe, the network's share
    crosses the GPU's PCIe link too)."""
    return sum(all_to_all_terms(payload_bytes, world, fabric))


def all_to_all_terms(payload_bytes: float, world: int, fabric: Fabric) -> tuple[float, float, float]:
    """(seconds of the count exchange, of the payload's latency, to move the payload) of one all-to-all."""
    if world == 1:
        return 0.0, 0.0, 0.0
    in_node = min(world, fabric.gpus_per_node)
    intra_bytes = payload_bytes * (in_node - 1) / world
    inter_bytes = payload_bytes * (world - in_node) / world
    node_link_bytes = intra_bytes + (inter_bytes if fabric.intra.host_bus else 0.0)
    seconds = node_link_bytes / (fabric.intra.gbs * fabric.efficiency * 1e9)
    links = [fabric.intra]
    if inter_bytes:
        seconds = max(seconds, inter_bytes / (fabric.inter_gbs() * fabric.efficiency * 1e9))
        links.append(fabric.inter)
    return max(link.counts_us for link in links) * 1e-6, max(link.latency_us for link in links) * 1e-6, seconds


def all_reduce_seconds(nbytes: float, world: int, fabric: Fabric) -> float:
    """Ring all-reduce bandwidth term over the slowest link crossed, tree latency term (what NCCL picks)."""
    if world == 1:
        return 0.0
    crosses_nodes = world > fabric.gpus_per_node
    gbs = min(fabric.intra.gbs, fabric.inter_gbs()) if crosses_nodes else fabric.intra.gbs
    latency = max(fabric.intra.latency_us, fabric.inter.latency_us) if crosses_nodes else fabric.intra.latency_us
    return 2 * (world - 1) / world * nbytes / (gbs * fabric.efficiency * 1e9) + 2 * math.ceil(math.log2(world)) * latency * 1e-6


@dataclass(frozen=True)
class DeviceCosts:
    """Times measured on one device at one shape (bench/scale_model.py --measure-gpu / --validate-cpu).

    dense_ms: everything of a step but the store and the exchange (the Embedding front's unique and gather,
    the dense model forward and backward, the dense optimizer), per precision; store_ms: lookup + update of
    `unique_keys` rows; pack_ms: `ShardedRows`' own work around the all-to-alls (routing, sorting, the
    gradient sum) for a world of one; codec_ms: encode + decode of rows and gradients per wire format.
    """

    device: str
    batch: int
    dim: int
    unique_keys: int
    dense_params: int
    dense_ms: dict[str, float]
    store_ms: float
    pack_ms: float
    codec_ms: dict[str, float]
    source: str = "measured"

    def scaled(self, batch: int, dim: int, dense_params: int) -> "DeviceCosts":
        """The same device at another shape: dense work grows with batch x dense size, row work with dim."""
        dense_factor = batch / self.batch * dense_params / self.dense_params
        return replace(self, batch=batch, dim=dim, dense_params=dense_params,
                       dense_ms={p: ms * dense_factor for p, ms in self.dense_ms.items()},
                       store_ms=self.store_ms * dim / self.dim, pack_ms=self.pack_ms * dim / self.dim,
                       codec_ms={w: ms * dim / self.dim for w, ms in self.codec_ms.items()})

    def per_key(self, ms: float) -> float:
        return ms / self.unique_keys


@dataclass(frozen=True)
class KeyDistribution:
    """Per-feature ID distributions: rank r of feature f drawn with probability ~ 1 / (r + 1)^exponent."""

    cardinalities: tuple[int, ...]
    exponent: float

    def expected_unique(self, samples: int) -> float:
        """Expected distinct keys among `samples` rows: sum over IDs of 1 - (1 - p)^samples."""
        return _expected_unique(self.cardinalities, self.exponent, int(samples))


@lru_cache(maxsize=256)
def _expected_unique(cardinalities: tuple[int, ...], exponent: float, samples: int) -> float:
    import numpy as np

    total = 0.0
    weights = 1.0 / np.arange(1, max(cardinalities) + 1, dtype=np.float64) ** exponent
    for cardinality in cardinalities:
        p = weights[:cardinality] / weights[:cardinality].sum()
        total += float(-np.expm1(samples * np.log1p(-np.minimum(p, 1 - 1e-16))).sum())
    return total


@dataclass(frozen=True)
class Prediction:
    world: int
    wire: str
    precision: str
    unique_keys: float
    owned_keys: float
    wire_bytes: float  # per worker per step, leaving the GPU
    ms: dict[str, float] = field(default_factory=dict)  # dense, store, pack, codec, exchange, all_reduce, step
    samples_per_s_per_gpu: float = 0.0


def predict_step(costs: DeviceCosts, keys: KeyDistribution | None, world: int, fabric: Fabric, wire: str = "fp32",
                 precision: str = "fp32", overlap: bool = False, unique_keys: float | None = None,
                 owned_keys: float | None = None, wait_ms: float = 0.0) -> Prediction:
    """One step on each of `world` workers at `costs.batch` samples per worker.

    Unique keys per worker come from `keys` (or `unique_keys` / `owned_keys` when measured); `wait_ms` is the
    wait for the slowest worker per step (`slowest_worker_wait_ms`), where it was measured."""
    b = costs.batch
    u = unique_keys if unique_keys is not None else keys.expected_unique(b)
    owned = owned_keys if owned_keys is not None else (keys.expected_unique(b * world) / world if keys else u)
    row = wire_row_bytes(wire, costs.dim)
    sharded = world > 1
    ms = {"dense": costs.dense_ms[precision],
          "store": costs.per_key(costs.store_ms) * owned,
          "pack": costs.per_key(costs.pack_ms) * u if sharded else 0.0,
          "codec": costs.per_key(costs.codec_ms[wire]) * u if sharded else 0.0,
          "exchange": 1e3 * sum(all_to_all_seconds(payload, world, fabric) for payload in (KEY_BYTES * u, row * u, row * u)),
          "all_reduce": 1e3 * all_reduce_seconds(4 * costs.dense_params, world, fabric),
          "wait": wait_ms if sharded else 0.0}
    compute = ms["dense"] + ms["store"] + ms["pack"] + ms["codec"]
    communicate = ms["exchange"] + ms["all_reduce"]
    ms["step"] = (max(compute, communicate) if overlap else compute + communicate) + ms["wait"]
    return Prediction(world, wire, precision, u, owned, bytes_sent_per_step(u, costs.dim, wire) * (world - 1) / world,
                      ms, b / ms["step"] * 1e3)


def slowest_worker_wait_ms(segments: list[list[list[float]]]) -> float:
    """The expected wait per step for the slowest worker: `segments[r][s][k]` is worker r's time (ms) in step s
    between collective k - 1 and k (measured without waiting, each worker on its own). At each collective every
    worker waits for the last one; if the workers' times are independent draws from their own samples, a step
    takes the sum over k of E[max over r] where the model's compute is the mean; the difference is the wait.
    Exact over the samples: P(max <= v) is the product of the workers' empirical distribution functions."""
    import numpy as np

    wait = 0.0
    for k in range(len(segments[0][0])):
        samples = [np.sort([step[k] for step in worker]) for worker in segments]
        values = np.unique(np.concatenate(samples))
        below = np.prod([np.searchsorted(s, values, side="right") / len(s) for s in samples], axis=0)
        expected_max = float(np.sum(values * np.diff(below, prepend=0.0)))
        wait += expected_max - float(np.mean([s.mean() for s in samples]))
    return wait


def pick_wire(predictions: dict[str, Prediction], margin: float = 0.03) -> tuple[str, str]:
    """(wire, why): the fastest format, unless fp32 (exact) is within `margin` of it."""
    fastest = max(predictions.values(), key=lambda p: p.samples_per_s_per_gpu)
    fp32 = predictions["fp32"]
    gain = fastest.samples_per_s_per_gpu / fp32.samples_per_s_per_gpu - 1
    if fastest.wire == "fp32" or gain < margin:
        return "fp32", f"the exchange costs too little here for a narrower wire to gain {margin:.0%} (best: {fastest.wire} {gain:+.1%})"
    return fastest.wire, f"{gain:+.1%} samples/s over fp32 (int8 and bf16 kept AUC within 0.001 of fp32 on CPU runs)"


def memory_per_gpu(rows: int, dim: int, optimizer_states: int, world: int, store_kind: str,
                   cache_bytes: float | None, host_bytes: float | None, gpu_bytes: float, host_memory_bytes: float,
                   dense_params: int, dense_optimizer_states: int, index_bytes_per_row: int = 32) -> dict[str, float]:
    """Bytes per GPU (and per GPU's share of host memory and disk) for one shard of `rows` / `world` rows.

    A row is [row | optimizer state] in fp32 plus the encoder's index (key + slot at half load: 32 B);
    cached tiers add their per-slot metadata. Budgets below 1 are fractions of the tier's memory,
    as in the store factory. Activations are not counted."""
    shard_rows = math.ceil(rows / world)
    value_bytes = dim * (1 + optimizer_states) * 4
    dense_bytes = dense_params * 4 * (2 + dense_optimizer_states)  # weights, gradients, optimizer state
    tiers = {"gpu_dense": float(dense_bytes), "gpu_rows": 0.0, "host_rows": 0.0, "ssd_rows": 0.0}
    if store_kind == "device":
        tiers["gpu_rows"] = shard_rows * (value_bytes + index_bytes_per_row)
        return tiers
    cache = 0.25 * gpu_bytes if cache_bytes is None else (cache_bytes * gpu_bytes if cache_bytes < 1 else cache_bytes)
    tiers["gpu_rows"] = min(cache, shard_rows * (value_bytes + METADATA_BYTES_PER_SLOT))
    host_budget = None if host_bytes is None else (host_bytes * host_memory_bytes if host_bytes < 1 else host_bytes)
    if store_kind == "cached_host":
        tiers["host_rows"] = shard_rows * (value_bytes + index_bytes_per_row)
        if host_budget is not None and tiers["host_rows"] > host_budget:
            raise ValueError(f"store.host_bytes {host_budget:.3g} B holds fewer than the {shard_rows} rows of a shard "
                             f"({tiers['host_rows']:.3g} B); raise it or use more GPUs")
    else:
        tiers["host_rows"] = min(host_budget or 0.0, shard_rows * (value_bytes + METADATA_BYTES_PER_SLOT))
        tiers["ssd_rows"] = shard_rows * value_bytes
    return tiers
