"""The one 64-bit hash of terarec, splitmix64 (Steele et al.), and the free-cell marker of its hash tables.

Keys, buckets, initial rows, raw IDs from hex strings and the eval split all hash through `splitmix64`; the
Triton probe (triton_hash.py) mixes with the same constants. torch has no uint64, so values live in int64:
every shift that must be logical is masked, and multiplication wraps like unsigned arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # as unsigned 64-bit
EMPTY_KEY = -(2**63)  # marks a free cell in hash tables; never a feature key


def signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return value - 2**64 if value >= 2**63 else value


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as uint64."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A bijective 64-bit mixer on int64 tensors (bits as uint64)."""
    z = x + signed(GOLDEN)
    z = (z ^ shift_right(z, 30)) * signed(MIX1)
    z = (z ^ shift_right(z, 27)) * signed(MIX2)
    return z ^ shift_right(z, 31)


def splitmix64_uint64(x) -> np.ndarray:
    """`splitmix64` on numpy uint64 values (any shape, scalars too)."""
    values = np.asarray(x, dtype=np.uint64)
    flat = torch.from_numpy(np.ascontiguousarray(values.reshape(-1)).view(np.int64))
    return splitmix64(flat).numpy().view(np.uint64).reshape(values.shape)
