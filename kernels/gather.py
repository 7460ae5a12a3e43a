"""Embedding row gather (+ sum pooling) for the lookup path, and the per-unique-key gradient reduction.

`gather_rows` and `gather_sum` are what callers use: the Triton kernels on CUDA
(16-byte row loads; see triton_gather.py), the torch references elsewhere.
Their backward is `reduce_by_key`: the gradients of every occurrence of a row
summed into one gradient per unique row. `gather_rows` may hand out rows in a
narrower dtype than the table's (bf16 rows for an autocast dense part, read
from fp32 rows in one pass); their gradients come back in the table's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import use_fused


def gather_rows_reference(table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """table [N, D] (rows may be strided), idx [M] int -> [M, D] in `dtype` (default the table's)."""
    return table[idx].to(dtype or table.dtype)


def gather_sum_reference(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table [N, D], idx [B, L] int -> [B, D]: each bag's rows summed."""
    return table[idx].sum(1)


def reduce_by_key_reference(grads: torch.Tensor, inverse: torch.Tensor, num_unique: int) -> torch.Tensor:
    """grads [M, D], inverse [M] in [0, num_unique) -> [num_unique, D]: out[u] = sum of grads[m] with inverse[m] == u."""
    out = torch.zeros((num_unique, grads.shape[1]), device=grads.device, dtype=torch.float32)
    return out.index_add_(0, inverse, grads.float()).to(grads.dtype)


class KeyOrder(NamedTuple):
    """Occurrences grouped by key: keys[permutation] are in ascending order and equal unique[sorted_inverse]."""
    permutation: torch.Tensor
    sorted_inverse: torch.Tensor


def unique_with_order(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, KeyOrder]:
    """`torch.unique(keys, return_inverse=True)` from one sort, plus that sort's `KeyOrder` (free here), which
    the lookup's backward uses to sum each key's gradients as runs."""
    flat = keys.reshape(-1)
    sorted_keys, permutation = torch.sort(flat)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    sorted_inverse = torch.cumsum(starts, 0) - 1
    inverse = torch.empty_like(permutation).scatter_(0, permutation, sorted_inverse)
    return sorted_keys[starts], inverse.view(keys.shape), KeyOrder(permutation, sorted_inverse)


def gather_rows(table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype | None = None,
                order: KeyOrder | None = None) -> torch.Tensor:
    """Dispatch (autograd through `reduce_by_key`): table [N, D], idx [M] -> [M, D] in `dtype` (default the table's).

    `order`, idx's `KeyOrder` when idx is `unique_with_order`'s inverse, speeds up the fused backward."""
    if use_fused(table):
        from .triton_gather import GatherRows
        return GatherRows.apply(table, idx, dtype, order)
    return gather_rows_reference(table, idx, dtype)


def gather_sum(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Dispatch: table [N, D], idx [B, L] -> [B, D] bag sums."""
    if use_fused(table):
        from .triton_gather import GatherSum
        return GatherSum.apply(table, idx)
    return gather_sum_reference(table, idx)


def reduce_by_key(grads: torch.Tensor, inverse: torch.Tensor, num_unique: int) -> torch.Tensor:
    """Dispatch: grads [M, D], inverse [M] -> [num_unique, D] per-key sums (fp32 accumulation)."""
    if use_fused(grads):
        from .triton_gather import reduce_by_key_forward
        return reduce_by_key_forward(grads, inverse, num_unique)
    return reduce_by_key_reference(grads, inverse, num_unique)
