"""Build a shard's store from the job's `store` config section."""
from __future__ import annotations

import torch

from .base import EmbeddingStore
from .device import DeviceStore
from .optim import SparseOptimizer

STORE_KINDS = ("device", "cached_host", "cached_ssd")


def make_store(kind: str, dim: int, optimizer: SparseOptimizer, seed: int = 0, init_scale: float = 0.05,
               device: torch.device | str = "cpu", policy: str = "lru", cache_bytes: float | None = None,
               host_bytes: float | None = None, path: str | None = None) -> EmbeddingStore:
    """kind: device | cached_host | cached_ssd. Byte sizes below 1 are fractions of free memory."""
    if kind == "device":
        return DeviceStore(dim, optimizer, seed, init_scale, device=device)
    raise ValueError(f"store.kind {kind!r} is not available; choose one of {', '.join(STORE_KINDS)}")
