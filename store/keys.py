"""64-bit key arithmetic: feature keys, hashing, and initial rows that depend only on (seed, key).

torch has no uint64, so keys live in int64 and every shift that must be
logical is masked; multiplication wraps like unsigned arithmetic.
"""
from __future__ import annotations

import torch

EMPTY_KEY = -(2**63)  # marks a free slot in hash tables; never produced by `feature_keys`


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as uint64."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A bijective 64-bit mixer (Steele et al.); the hash of every key in terarec."""
    z = x + _GOLDEN
    z = (z ^ shift_right(z, 30)) * _MIX1
    z = (z ^ shift_right(z, 27)) * _MIX2
    return z ^ shift_right(z, 31)


def splitmix64_int(value: int) -> int:
    return int(splitmix64(torch.tensor([_signed(value % 2**64)], dtype=torch.int64))[0])


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
    return shift_right(splitmix64(keys ^ _MIX2), 33) % num_buckets
