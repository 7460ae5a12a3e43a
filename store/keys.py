"""64-bit key arithmetic: feature keys, buckets, and initial rows that depend only on (seed, key), all through
the one splitmix64 of `terarec.kernels.hashing`."""
from __future__ import annotations

import torch

from terarec.kernels.hashing import EMPTY_KEY, MIX2, shift_right, signed, splitmix64

__all__ = ["EMPTY_KEY", "bucket_of", "feature_keys", "initial_rows", "splitmix64"]


def splitmix64_int(value: int) -> int:
    return int(splitmix64(torch.tensor([signed(value % 2**64)], dtype=torch.int64))[0])


def feature_keys(sparse_ids: torch.Tensor) -> torch.Tensor:
    """[B, F] raw IDs -> [B, F] keys: each (feature, raw ID) pair gets its own 64-bit key."""
    num_features = sparse_ids.shape[1]
    salts = splitmix64(torch.arange(1, num_features + 1, dtype=torch.int64, device=sparse_ids.device) * 7919)
    keys = splitmix64(sparse_ids ^ salts)
    return torch.where(keys == EMPTY_KEY, keys + 1, keys)


def initial_rows(keys: torch.Tensor, dim: int, seed: int, scale: float) -> torch.Tensor:
    """[N] keys -> [N, dim] float32 rows, uniform in [-scale, scale).

    A row depends only on (seed, key): never on insertion order, shard or device,
    so runs are reproducible and rows can move between shards.
    """
    base = splitmix64(keys ^ splitmix64_int(seed))
    bits = splitmix64(base.unsqueeze(1) + torch.arange(dim, dtype=torch.int64, device=keys.device))
    unit = shift_right(bits, 11).to(torch.float64) * (1.0 / 2**53)
    return ((2.0 * unit - 1.0) * scale).to(torch.float32)


def bucket_of(keys: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Key -> bucket in [0, num_buckets): the unit that shards own and move."""
    return shift_right(splitmix64(keys ^ signed(MIX2)), 33) % num_buckets
