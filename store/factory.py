"""Build a shard's store from the job's `store` config section."""
from __future__ import annotations

import torch

from .base import EmbeddingStore
from .cache import METADATA_BYTES_PER_SLOT, CacheLevel
from .device import DeviceStore
from .host import HostTable
from .optim import SparseOptimizer
from .ssd import SsdTable
from .tiered import TieredStore

STORE_KINDS = ("device", "cached_host", "cached_ssd")
DEFAULT_CACHE_FRACTION = 0.25
DEVICE_INDEX_BYTES_PER_ROW = 32  # a device store's encoder: two 8-byte cells a row at load 0.5


def free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or available host memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; give the store budgets in bytes")


def budget_rows(budget: float, row_bytes: int, device: torch.device, field: str) -> int:
    """Rows that fit a byte budget; a budget below 1 is that fraction of the device's free memory."""
    if budget <= 0:
        raise ValueError(f"{field} must be positive (bytes, or a fraction of free memory below 1), got {budget}")
    nbytes = budget * free_bytes(device) if budget < 1 else budget
    return int(nbytes // row_bytes)


def make_store(kind: str, dim: int, optimizer: SparseOptimizer, seed: int = 0, init_scale: float = 0.05,
               device: torch.device | str = "cpu", policy: str = "lru", cache_bytes: float | None = None,
               host_bytes: float | None = None, path: str | None = None,
               expected_rows: int | None = None) -> EmbeddingStore:
    """kind: device | cached_host | cached_ssd. Byte sizes below 1 are fractions of free memory.

    device: rows on `device`, first sized for `expected_rows` (capped at a quarter of free memory), growing by
    doubling past it.

    cached_host: `cache_bytes` of rows on `device` (default a quarter of its free memory) in front of a
    host table bounded by `host_bytes` (default: unbounded). cached_ssd: the same cache, then a host
    cache of `host_bytes` (none if not given), in front of the SSD table under `path`, reopened at its
    last snapshot if one is there.
    """
    if kind not in STORE_KINDS:
        raise ValueError(f"store.kind {kind!r} is not available; choose one of {', '.join(STORE_KINDS)}")
    device = torch.device(device)
    width = dim * (1 + len(optimizer.state_names))
    if kind == "device":
        initial = DeviceStore.INITIAL_ROWS
        if expected_rows:  # sized up front, but never past a share of free memory (the rows may be an overestimate)
            fits = budget_rows(DEFAULT_CACHE_FRACTION, width * 4 + DEVICE_INDEX_BYTES_PER_ROW, device,
                               "the device store's first size")
            initial = max(initial, min(expected_rows, fits))
        return DeviceStore(dim, optimizer, seed, init_scale, device=device, initial_capacity=initial)
    slot_bytes = width * 4 + METADATA_BYTES_PER_SLOT
    gpu = device.type == "cuda"  # rows read on the CPU go on to the GPU: read them into page-locked memory
    cache_rows = budget_rows(DEFAULT_CACHE_FRACTION if cache_bytes is None else cache_bytes, slot_bytes, device,
                             "store.cache_bytes")
    host = torch.device("cpu")
    if kind == "cached_host":
        host_rows = None if host_bytes is None else budget_rows(host_bytes, width * 4, host, "store.host_bytes")
        table = HostTable(width, host_rows, device)
        lower = table
    else:
        if not path:
            raise ValueError("store.kind cached_ssd needs store.path: the directory of the SSD table")
        table = SsdTable(path, width, {"dim": dim, "optimizer": type(optimizer).__name__}, pinned=gpu)
        lower = table
        if host_bytes:  # a victim cache of the GPU cache: its misses cost nothing there (cache.py, read-around)
            lower = CacheLevel(table, width, budget_rows(host_bytes, slot_bytes, host, "store.host_bytes"), policy,
                               host, name="host_cache", read_around=True, pinned=gpu)
    cache = CacheLevel(lower, width, cache_rows, policy, device, name="cache")
    return TieredStore(dim, optimizer, cache, table, seed, init_scale)
