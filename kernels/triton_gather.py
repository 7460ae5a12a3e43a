"""Row gather, bag-sum gather and per-key gradient reduction in Triton.

Rows are read as [BLOCK_M, BLOCK_D] tiles, contiguous along D: with D * 4 bytes
a multiple of 16 and the row stride too, each thread's loads are 16 bytes wide.
The reduction adds each gradient row into its key's fp32 row with atomics
(order-dependent in the last bits, like `index_add_` on CUDA). Given the
occurrences grouped by key (`reduce_sorted_forward`), a block first sums each
run of equal keys it holds (a segmented scan) and adds one row per run: a hot
key (a feature with a handful of values appears in every sample) then costs an
atomic row per block instead of one per occurrence, all on the same addresses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 32


@triton.jit(do_not_specialize=["M"])  # varies per call: no variant per size % 16
def _gather_rows(table_ptr, idx_ptr, out_ptr, M, stride, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    idx = tl.load(idx_ptr + rows, mask=rows < M, other=0).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    values = tl.load(table_ptr + idx[:, None] * stride + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B"])  # varies per call: no variant per size % 16
def _gather_sum(table_ptr, idx_ptr, out_ptr, B, stride, L: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bags = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (bags[:, None] < B) & (cols[None, :] < D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for l in range(L):
        idx = tl.load(idx_ptr + bags * L + l, mask=bags < B, other=0).to(tl.int64)
        acc += tl.load(table_ptr + idx[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + bags[:, None].to(tl.int64) * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # varies per call: no variant per size % 16
def _reduce_by_key(grads_ptr, inverse_ptr, out_ptr, M, GROUP: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[inverse[m]] += grads[m // GROUP] (GROUP > 1: one bag gradient shared by its L rows)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    key = tl.load(inverse_ptr + rows, mask=rows < M, other=0).to(tl.int64)
    grads = tl.load(grads_ptr + (rows[:, None] // GROUP).to(tl.int64) * D + cols[None, :], mask=mask, other=0.0)
    tl.atomic_add(out_ptr + key[:, None] * D + cols[None, :], grads.to(tl.float32), mask=mask, sem="relaxed")


@triton.jit
def _add_within_runs(a, a_starts, b, b_starts):
    """Segmented sum: b's running value restarts where b starts a run."""
    return tl.where(b_starts != 0, b, a + b), a_starts | b_starts


@triton.jit(do_not_specialize=["M"])  # varies per call: no variant per size % 16
def _reduce_sorted(grads_ptr, order_ptr, keys_ptr, out_ptr, M, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """out[keys[m]] += grads[order[m]] with keys sorted: one atomic row per run of equal keys in the block."""
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    valid = rows < M
    key = tl.load(keys_ptr + rows, mask=valid, other=-1)
    before = tl.load(keys_ptr + rows - 1, mask=valid & (rows > first), other=-1)
    after = tl.load(keys_ptr + rows + 1, mask=(rows + 1 < M) & (rows + 1 < first + BLOCK_M), other=-1)
    source = tl.load(order_ptr + rows, mask=valid, other=0).to(tl.int64)
    mask = valid[:, None] & (cols[None, :] < D)
    grads = tl.load(grads_ptr + source[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    starts = tl.broadcast_to((key != before).to(tl.int32)[:, None], (BLOCK_M, BLOCK_D))
    sums, _ = tl.associative_scan((grads, starts), 0, _add_within_runs)
    ends = valid & (key != after)                                                   # a run's last row holds its sum
    tl.atomic_add(out_ptr + key[:, None].to(tl.int64) * D + cols[None, :], sums, mask=ends[:, None] & mask,
                  sem="relaxed")


def _blocks(dim: int) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(dim))


def gather_rows_forward(table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launcher: table [N, D] with unit column stride, idx [M] -> [M, D] in `dtype` (default the table's)."""
    m, dim = idx.numel(), table.shape[1]
    out = torch.empty((m, dim), device=table.device, dtype=dtype or table.dtype)
    _gather_rows[(triton.cdiv(m, BLOCK_M),)](table, idx.contiguous(), out, m, table.stride(0), dim, **_blocks(dim))
    return out


def gather_sum_forward(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Launcher: table [N, D], idx [B, L] -> [B, D]."""
    bags, length = idx.shape
    dim = table.shape[1]
    out = torch.empty((bags, dim), device=table.device, dtype=table.dtype)
    _gather_sum[(triton.cdiv(bags, BLOCK_M),)](table, idx.contiguous(), out, bags, table.stride(0), length, dim,
                                               **_blocks(dim))
    return out


def reduce_by_key_forward(grads: torch.Tensor, inverse: torch.Tensor, num_unique: int, group: int = 1,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launcher: grads [M / group, D], inverse [M] -> [num_unique, D] in `dtype` (default grads'), summed in fp32."""
    grads = grads.contiguous()
    inverse = inverse.reshape(-1).contiguous()
    m, dim = inverse.numel(), grads.shape[1]
    out = torch.zeros((num_unique, dim), device=grads.device, dtype=torch.float32)
    _reduce_by_key[(triton.cdiv(m, BLOCK_M),)](grads, inverse, out, m, group, dim, **_blocks(dim))
    return out.to(dtype or grads.dtype)


SORTED_BLOCK_M = 64  # rows per block of the run-summing reduction: hot keys' atomics fall by this factor


def reduce_sorted_forward(grads: torch.Tensor, order: torch.Tensor, sorted_keys: torch.Tensor, num_unique: int,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launcher: grads [M, D], order [M] (occurrences grouped by key), sorted_keys [M] (ascending, in
    [0, num_unique)) -> [num_unique, D] in `dtype` (default grads'): out[sorted_keys[m]] += grads[order[m]], fp32."""
    grads = grads.contiguous()
    m, dim = order.numel(), grads.shape[1]
    out = torch.zeros((num_unique, dim), device=grads.device, dtype=torch.float32)
    _reduce_sorted[(triton.cdiv(m, SORTED_BLOCK_M),)](grads, order.contiguous(), sorted_keys.contiguous(), out, m,
                                                      dim, BLOCK_M=SORTED_BLOCK_M,
                                                      BLOCK_D=triton.next_power_of_2(dim))
    return out.to(dtype or grads.dtype)


def _check_rows(table: torch.Tensor) -> torch.Tensor:
    return table if table.stride(1) == 1 else table.contiguous()


class GatherRows(torch.autograd.Function):
    """Rows out in `dtype`; their gradients summed per row in fp32 and returned in the table's dtype.

    `order` (a `gather.KeyOrder` of idx, from `unique_with_order`) lets the backward sum runs of equal rows."""

    @staticmethod
    def forward(ctx, table, idx, dtype=None, order=None):
        ctx.save_for_backward(idx, *((order.permutation, order.sorted_inverse) if order is not None else ()))
        ctx.num_rows, ctx.table_dtype = table.shape[0], table.dtype
        return gather_rows_forward(_check_rows(table), idx.reshape(-1), dtype).reshape(*idx.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad):
        idx, *order = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        if order:
            return reduce_sorted_forward(grad, *order, ctx.num_rows, dtype=ctx.table_dtype), None, None, None
        return reduce_by_key_forward(grad, idx, ctx.num_rows, dtype=ctx.table_dtype), None, None, None


class GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, idx):
        ctx.save_for_backward(idx)
        ctx.num_rows = table.shape[0]
        return gather_sum_forward(_check_rows(table), idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return reduce_by_key_forward(grad, idx, ctx.num_rows, group=idx.shape[1]), None
