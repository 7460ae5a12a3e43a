"""Sparse optimizer steps applied in place to a store's wide rows, in Triton: one pass instead of gather-apply-scatter.

A store keeps each key's value as `[row | state_0 | state_1 ...]` (each part
`dim` wide) in `values [capacity, value_width]`; this kernel reads the rows of
`slots` and their state, applies SGD, Adagrad or Adam with the per-key summed
gradients, and writes them back where they are. The reference is the
functional `apply` of `terarec.store.optim` (gather `values[slots]`, apply,
scatter back), with the same formulas in the same order; division and square
root are rounded like torch's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 32
KINDS = {"sgd": 0, "adagrad": 1, "adam": 2}


@triton.jit(do_not_specialize=["n"])  # varies per call: no variant per size % 16
def _sparse_update(values_ptr, slots_ptr, grads_ptr, n, stride, lr, eps, keep1, keep2, D: tl.constexpr,
                   KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """KIND 0: w -= lr g. 1 (Adagrad): s += g g; w -= lr g / (sqrt(s) + eps).
    2 (Adam, lr = bias-corrected step size): m += (g - m) keep1; v += (g g - v) keep2; w -= lr m / (sqrt(v) + eps)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n) & (cols[None, :] < D)
    slots = tl.load(slots_ptr + rows, mask=rows < n, other=0).to(tl.int64)
    row_ptrs = values_ptr + slots[:, None] * stride + cols[None, :]
    grads = tl.load(grads_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=mask)
    weights = tl.load(row_ptrs, mask=mask)
    if KIND == 0:
        weights = weights - lr * grads
    elif KIND == 1:
        state_sum = tl.load(row_ptrs + D, mask=mask) + grads * grads
        tl.store(row_ptrs + D, state_sum, mask=mask)
        weights = weights - tl.div_rn(lr * grads, tl.sqrt_rn(state_sum) + eps)
    else:
        exp_avg = tl.load(row_ptrs + D, mask=mask)
        exp_avg_sq = tl.load(row_ptrs + 2 * D, mask=mask)
        exp_avg = exp_avg + (grads - exp_avg) * keep1
        exp_avg_sq = exp_avg_sq + (grads * grads - exp_avg_sq) * keep2
        tl.store(row_ptrs + D, exp_avg, mask=mask)
        tl.store(row_ptrs + 2 * D, exp_avg_sq, mask=mask)
        weights = weights - tl.div_rn(lr * exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)
    tl.store(row_ptrs, weights, mask=mask)


def sparse_update_(values: torch.Tensor, slots: torch.Tensor, grads: torch.Tensor, kind: str, lr: float,
                   eps: float = 0.0, keep1: float = 0.0, keep2: float = 0.0) -> None:
    """Launcher: values [capacity, value_width] fp32 (updated in place), slots [N] unique, grads [N, dim] fp32.

    kind: "sgd", "adagrad" or "adam"; for Adam, `lr` is the bias-corrected step size and keep1, keep2 are
    1 - beta1, 1 - beta2 (what terarec.store.optim's `fused_args(step)` gives).
    """
    if kind not in KINDS:
        raise ValueError(f"no fused update for optimizer kind {kind!r}; use one of {sorted(KINDS)}")
    n, dim = grads.shape
    if n == 0:
        return
    assert values.stride(1) == 1 and values.dtype == torch.float32
    _sparse_update[(triton.cdiv(n, BLOCK_M),)](values, slots.contiguous(), grads.contiguous(), n, values.stride(0),
                                               lr, eps, keep1, keep2, dim, KINDS[kind], BLOCK_M=BLOCK_M,
                                               BLOCK_D=triton.next_power_of_2(dim))
