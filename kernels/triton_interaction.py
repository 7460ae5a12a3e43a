"""Fused dot interaction in Triton: one kernel forward, one backward, no [B, F, F] tensor in memory.

Each program takes one sample: its F + 1 vectors [dense, sparse_0, ...] as one
[BLOCK_N, D] tile in registers, the Gram matrix through `tl.dot`, and the lower
triangle stored straight into its place in the output row. The backward builds
the symmetric pair-gradient tile S from the output gradient and returns S @ X.
Operands go to the dot in fp32: fp32 inputs use the 3-pass tf32 split (about
fp32 accuracy) or, where torch's fp32 matmuls run in TF32, one pass of tf32;
bf16/fp16 inputs are exact in tf32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import tf32_matmuls
from .interaction import interaction_output_dim


@triton.jit
def _load_vectors(dense_ptr, sparse_ptr, b, F: tl.constexpr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, k0=0):
    """Columns k0 .. k0 + BLOCK_D of rows [dense_b, sparse_b0, ..., sparse_b{F-1}] as a [BLOCK_N, BLOCK_D] fp32 tile."""
    i = tl.arange(0, BLOCK_N)[:, None]
    d = k0 + tl.arange(0, BLOCK_D)[None, :]
    in_d = d < D
    x = tl.load(sparse_ptr + b * (F * D) + (i - 1) * D + d, mask=(i >= 1) & (i <= F) & in_d, other=0.0)
    x_dense = tl.load(dense_ptr + b * D + i * 0 + d, mask=(i == 0) & in_d, other=0.0)
    return x.to(tl.float32) + x_dense.to(tl.float32)


@triton.jit
def _pair_index(i, j, SELF: tl.constexpr):
    """Position of pair (i, j), i >= j, in the row-major lower triangle; and whether it is a pair."""
    if SELF:
        return i * (i + 1) // 2 + j, j <= i
    else:
        return i * (i - 1) // 2 + j, j < i


@triton.jit
def _dot_interaction_fwd(dense_ptr, sparse_ptr, out_ptr,
                         F: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr, WIDTH: tl.constexpr,
                         SELF: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    gram = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, BLOCK_D, BLOCK_K):                                        # small dot operands: occupancy
        x = _load_vectors(dense_ptr, sparse_ptr, b, F, D, BLOCK_N, BLOCK_K, k0)  # [N, K]
        gram += tl.dot(x, tl.trans(x), input_precision=PRECISION)                # [N, N]
    out_row = out_ptr + b * WIDTH
    i = tl.arange(0, BLOCK_N)[:, None]
    j = tl.arange(0, BLOCK_N)[None, :]
    pair, is_pair = _pair_index(i, j, SELF)
    tl.store(out_row + D + pair, gram.to(out_ptr.dtype.element_ty), mask=is_pair & (i <= F))
    d = tl.arange(0, BLOCK_D)
    dense = tl.load(dense_ptr + b * D + d, mask=d < D)
    tl.store(out_row + d, dense, mask=d < D)
    if BLOCK_PAD > 0:
        p = D + PAIRS + tl.arange(0, BLOCK_PAD)
        tl.store(out_row + p, tl.zeros([BLOCK_PAD], dtype=out_ptr.dtype.element_ty), mask=p < WIDTH)


@triton.jit
def _dot_interaction_bwd(dense_ptr, sparse_ptr, grad_ptr, d_dense_ptr, d_sparse_ptr,
                         F: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr,
                         SELF: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    x = _load_vectors(dense_ptr, sparse_ptr, b, F, D, BLOCK_N, BLOCK_D)          # [N, D]
    grad_row = grad_ptr + b * WIDTH
    i = tl.arange(0, BLOCK_N)[:, None]
    j = tl.arange(0, BLOCK_N)[None, :]
    lower, is_lower = _pair_index(i, j, SELF)
    upper, is_upper = _pair_index(j, i, SELF)
    s = tl.load(grad_row + D + lower, mask=is_lower & (i <= F), other=0.0).to(tl.float32)
    s += tl.load(grad_row + D + upper, mask=is_upper & (j <= F), other=0.0).to(tl.float32)
    dx = tl.dot(s, x, input_precision=PRECISION)                                 # [N, D]
    d = tl.arange(0, BLOCK_D)[None, :]
    in_d = d < D
    dx += tl.load(grad_row + i * 0 + d, mask=(i == 0) & in_d, other=0.0).to(tl.float32)
    tl.store(d_dense_ptr + b * D + i * 0 + d, dx.to(d_dense_ptr.dtype.element_ty), mask=(i == 0) & in_d)
    tl.store(d_sparse_ptr + b * (F * D) + (i - 1) * D + d, dx.to(d_sparse_ptr.dtype.element_ty),
             mask=(i >= 1) & (i <= F) & in_d)


def _launch_args(dense: torch.Tensor, sparse: torch.Tensor) -> dict:
    num_sparse, dim = sparse.shape[1], sparse.shape[2]
    exact = dense.dtype == torch.float32 and not tf32_matmuls()
    return dict(F=num_sparse, D=dim, PRECISION="tf32x3" if exact else "tf32",
                BLOCK_N=max(16, triton.next_power_of_2(num_sparse + 1)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
                num_warps=4)


def dot_interaction_forward(dense: torch.Tensor, sparse: torch.Tensor, self_interaction: bool = False,
                            pad_to: int | None = None) -> torch.Tensor:
    """Launcher: dense [B, D], sparse [B, F, D] (contiguous, same dtype) -> [B, width]."""
    batch, num_sparse, dim = sparse.shape
    width = interaction_output_dim(dim, num_sparse, self_interaction, pad_to)
    pairs = interaction_output_dim(dim, num_sparse, self_interaction) - dim
    out = torch.empty((batch, width), device=dense.device, dtype=dense.dtype)
    pad = width - dim - pairs
    launch = _launch_args(dense, sparse)
    _dot_interaction_fwd[(batch,)](dense, sparse, out, PAIRS=pairs, WIDTH=width, SELF=self_interaction,
                                   BLOCK_PAD=triton.next_power_of_2(pad) if pad else 0,
                                   BLOCK_K=min(32, launch["BLOCK_D"]), **launch)
    return out


def dot_interaction_backward(dense: torch.Tensor, sparse: torch.Tensor, grad: torch.Tensor,
                             self_interaction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: the output gradient [B, width] -> (d_dense [B, D], d_sparse [B, F, D])."""
    d_dense = torch.empty_like(dense)
    d_sparse = torch.empty_like(sparse)
    _dot_interaction_bwd[(sparse.shape[0],)](dense, sparse, grad, d_dense, d_sparse, WIDTH=grad.shape[1],
                                             SELF=self_interaction, **_launch_args(dense, sparse))
    return d_dense, d_sparse


class FusedDotInteraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dense, sparse, self_interaction, pad_to):
        dense, sparse = dense.contiguous(), sparse.contiguous()
        ctx.save_for_backward(dense, sparse)
        ctx.self_interaction = self_interaction
        return dot_interaction_forward(dense, sparse, self_interaction, pad_to)

    @staticmethod
    def backward(ctx, grad):
        dense, sparse = ctx.saved_tensors
        d_dense, d_sparse = dot_interaction_backward(dense, sparse, grad.contiguous(), ctx.self_interaction)
        return d_dense, d_sparse, None, None
