"""Fused DCN cross layers in Triton: the elementwise part of each cross layer in one pass each way.

v1 (x0 * (x_l . w) + b + x_l): the row dot product and the update in one
forward kernel; the backward writes d_x0 and d_xl and per-block partial sums
of d_w and d_b in one pass (summed over blocks by torch, deterministic).
v2 (x0 * (x_l W^T + b) + x_l): the GEMM stays in cuBLAS (bias in its
epilogue); the product with x0 and the residual is one kernel, and the
backward's elementwise part (d_z = g * x0, d_x0 = g * z, partial d_b) is one
kernel before the two GEMMs; d_xl = g + d_z W comes out of one addmm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_B = 32
BWD_PROGRAMS = 1024


@triton.jit
def _tile(ptr, rows, cols, B, D: tl.constexpr):
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < B) & (cols[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _cross_v1_fwd(x0_ptr, xl_ptr, w_ptr, b_ptr, out_ptr, B, D: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    x0 = _tile(x0_ptr, rows, cols, B, D)
    xl = _tile(xl_ptr, rows, cols, B, D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    s = tl.sum(xl * w[None, :], axis=1)
    out = x0 * s[:, None] + bias[None, :] + xl
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < B) & (cols[None, :] < D))


@triton.jit
def _cross_v1_bwd(x0_ptr, xl_ptr, w_ptr, g_ptr, dx0_ptr, dxl_ptr, dw_part_ptr, db_part_ptr, B, D: tl.constexpr,
                  ITERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each program takes ITERS row blocks and writes one row of partial sums of d_w and d_b."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        x0 = _tile(x0_ptr, rows, cols, B, D)
        xl = _tile(xl_ptr, rows, cols, B, D)
        g = _tile(g_ptr, rows, cols, B, D)
        s = tl.sum(xl * w[None, :], axis=1)
        t = tl.sum(g * x0, axis=1)
        tl.store(dx0_ptr + offs, (g * s[:, None]).to(dx0_ptr.dtype.element_ty), mask=mask)
        tl.store(dxl_ptr + offs, (g + t[:, None] * w[None, :]).to(dxl_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(t[:, None] * xl, axis=0)
        db += tl.sum(g, axis=0)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=cols < D)
    tl.store(db_part_ptr + pid * D + cols, db, mask=cols < D)


@triton.jit
def _cross_v2_fwd(x0_ptr, z_ptr, xl_ptr, out_ptr, B, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    out = _tile(x0_ptr, rows, cols, B, D) * _tile(z_ptr, rows, cols, B, D) + _tile(xl_ptr, rows, cols, B, D)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < B) & (cols[None, :] < D))


@triton.jit
def _cross_v2_bwd(x0_ptr, z_ptr, g_ptr, dz_ptr, dx0_ptr, db_part_ptr, B, D: tl.constexpr,
                  ITERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        g = _tile(g_ptr, rows, cols, B, D)
        dz = g * _tile(x0_ptr, rows, cols, B, D)
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dx0_ptr + offs, (g * _tile(z_ptr, rows, cols, B, D)).to(dx0_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dz, axis=0)
    tl.store(db_part_ptr + pid * D + cols, db, mask=cols < D)


def _blocks(dim: int) -> dict:
    """Row tiles of about 4096 elements (whole rows: the v1 row dot needs them)."""
    block_d = triton.next_power_of_2(dim)
    return dict(BLOCK_B=max(1, min(MAX_BLOCK_B, 4096 // block_d)), BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)


def _grid(batch: int, dim: int) -> tuple[int]:
    return (triton.cdiv(batch, _blocks(dim)["BLOCK_B"]),)


def _bwd_grid(batch: int, dim: int) -> tuple[tuple[int], int]:
    """(grid, row blocks per program) for the backward: at most about BWD_PROGRAMS rows of partial sums."""
    blocks = _grid(batch, dim)[0]
    iters = triton.cdiv(blocks, BWD_PROGRAMS)
    return (triton.cdiv(blocks, iters),), iters


def cross_v1_forward(x0, xl, weight, bias):
    """Launcher: x0, xl [B, D] contiguous; weight, bias [D] -> [B, D]."""
    out = torch.empty_like(xl)
    _cross_v1_fwd[_grid(*x0.shape)](x0, xl, weight, bias, out, x0.shape[0], x0.shape[1], **_blocks(x0.shape[1]))
    return out


def cross_v1_backward(x0, xl, weight, grad):
    """Launcher: -> (d_x0, d_xl, d_weight, d_bias)."""
    batch, dim = x0.shape
    grid, iters = _bwd_grid(batch, dim)
    d_x0, d_xl = torch.empty_like(x0), torch.empty_like(xl)
    dw_part = torch.empty((grid[0], dim), device=x0.device, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    _cross_v1_bwd[grid](x0, xl, weight, grad, d_x0, d_xl, dw_part, db_part, batch, dim, iters, **_blocks(dim))
    return d_x0, d_xl, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def cross_v2_forward(x0, xl, weight, bias):
    """Launcher: -> (out [B, D], z = xl W^T + b, kept for the backward)."""
    z = torch.addmm(bias, xl, weight.t())
    out = torch.empty_like(xl)
    _cross_v2_fwd[_grid(*x0.shape)](x0, z, xl, out, x0.shape[0], x0.shape[1], **_blocks(x0.shape[1]))
    return out, z


def cross_v2_backward(x0, xl, weight, z, grad):
    """Launcher: -> (d_x0, d_xl, d_weight, d_bias)."""
    batch, dim = x0.shape
    grid, iters = _bwd_grid(batch, dim)
    d_z, d_x0 = torch.empty_like(z), torch.empty_like(x0)
    db_part = torch.empty((grid[0], dim), device=x0.device, dtype=torch.float32)
    _cross_v2_bwd[grid](x0, z, grad, d_z, d_x0, db_part, batch, dim, iters, **_blocks(dim))
    d_xl = torch.addmm(grad, d_z, weight)
    return d_x0, d_xl, d_z.t() @ xl, db_part.sum(0).to(weight.dtype)


class FusedCrossV1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, xl, weight, bias):
        x0, xl = x0.contiguous(), xl.contiguous()
        ctx.save_for_backward(x0, xl, weight)
        return cross_v1_forward(x0, xl, weight.contiguous(), bias.contiguous())

    @staticmethod
    def backward(ctx, grad):
        x0, xl, weight = ctx.saved_tensors
        return cross_v1_backward(x0, xl, weight.contiguous(), grad.contiguous())


class FusedCrossV2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, xl, weight, bias):
        x0, xl = x0.contiguous(), xl.contiguous()
        out, z = cross_v2_forward(x0, xl, weight, bias)
        ctx.save_for_backward(x0, xl, weight, z)
        return out

    @staticmethod
    def backward(ctx, grad):
        x0, xl, weight, z = ctx.saved_tensors
        return cross_v2_backward(x0, xl, weight, z, grad.contiguous())
