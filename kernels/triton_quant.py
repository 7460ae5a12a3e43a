"""Fused int8 row quantization in Triton: one pass from float rows to the wire payload and back.

`quantize_rows` reads each row once, takes its absmax, and writes the int8 row
and its float32 scale straight into the payload [N, D + 4] (bytes) that goes on
the wire — no separate scale tensor, no concatenation. `dequantize_rows` reads
the payload once and writes float32 rows. The reference is
`quant.quantize_int8_reference` (same arithmetic: IEEE division, round half to
even), which these kernels match bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import SCALE_BYTES, TINY, check_finite_rows

BLOCK_M = 16
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 to the nearest integer, ties to even


@triton.jit(do_not_specialize=["N"])  # varies per call: no variant per size % 16
def _quantize(rows_ptr, payload_ptr, bad_ptr, N, stride, D: tl.constexpr, TINY: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """rows [N, D] (row stride `stride`) -> payload [N, D + 4] int8: q, then the scale's 4 bytes; bad += rows with NaN/Inf."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(rows_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    magnitude = tl.abs(x)
    nonfinite = tl.max((~(magnitude <= FLOAT32_MAX)).to(tl.int32), axis=1)  # NaN fails every comparison
    bad = tl.sum(nonfinite, axis=0)
    tl.atomic_add(bad_ptr, bad, mask=bad > 0)
    scale = tl.maximum(tl.max(magnitude, axis=1) / 127.0, TINY)
    q = (x / scale[:, None] + ROUND_MAGIC) - ROUND_MAGIC
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
    out = payload_ptr + rows[:, None].to(tl.int64) * (D + 4)
    tl.store(out + cols[None, :], q, mask=mask)
    bits = scale.to(tl.int32, bitcast=True)
    byte = tl.arange(0, 4)
    scale_bytes = ((bits[:, None] >> (byte[None, :] * 8)) & 0xFF).to(tl.int8)  # little endian, as torch views it
    tl.store(out + D + byte[None, :], scale_bytes, mask=rows[:, None] < N)


@triton.jit(do_not_specialize=["N"])  # varies per call: no variant per size % 16
def _dequantize(payload_ptr, rows_ptr, N, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """payload [N, D + 4] int8 -> rows [N, D] float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    src = payload_ptr + rows[:, None].to(tl.int64) * (D + 4)
    byte = tl.arange(0, 4)
    scale_bytes = tl.load(src + D + byte[None, :], mask=rows[:, None] < N, other=0).to(tl.int32) & 0xFF
    bits = tl.sum(scale_bytes << (byte[None, :] * 8), axis=1)
    scale = bits.to(tl.float32, bitcast=True)
    q = tl.load(src + cols[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(rows_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], q * scale[:, None], mask=mask)


def _blocks(dim: int) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(max(dim, 1)))


def quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Launcher: rows [N, D] float (fp32/bf16/fp16, unit column stride) -> payload [N, D + 4] uint8.

    Raises ValueError if a row holds NaN or Inf (one 4-byte read back to the host).
    """
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    n, dim = rows.shape
    payload = torch.empty((n, dim + SCALE_BYTES), device=rows.device, dtype=torch.uint8)
    if n == 0:
        return payload
    bad = torch.zeros(1, device=rows.device, dtype=torch.int32)
    _quantize[(triton.cdiv(n, BLOCK_M),)](rows, payload.view(torch.int8), bad, n, rows.stride(0), dim, TINY,
                                          **_blocks(dim))
    check_finite_rows(int(bad.item()), n)
    return payload


def dequantize_rows(payload: torch.Tensor, dim: int) -> torch.Tensor:
    """Launcher: payload [N, dim + 4] uint8 (contiguous) -> rows [N, dim] float32."""
    payload = payload.contiguous()
    n = payload.shape[0]
    rows = torch.empty((n, dim), device=payload.device, dtype=torch.float32)
    if n:
        _dequantize[(triton.cdiv(n, BLOCK_M),)](payload.view(torch.int8), rows, n, dim, **_blocks(dim))
    return rows
