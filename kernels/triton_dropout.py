"""ReLU + dropout with a bitmask, in Triton: the kept-and-positive mask stored as 1 bit per element.

Forward: out = relu(h) * keep / (1 - p), and the bits (relu(h) > 0) & keep packed
32 to an int32 word, [M, ceil(N / 32)]: 1/8 of a bool mask. Backward, in one
pass: d_pre = grad * bit / (1 - p), with the bias gradient's per-block column
sums written on the way (the bias gradient of the layer that produced h);
`relu_mask_tile` reads a tile of the mask for the same step inside a GEMM's
epilogue (triton_mlp.py).
Without dropout the same backward reads the mask off the saved output (out > 0)
and no bits are stored at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 128


@triton.jit(do_not_specialize=["M", "seed"])  # varies per call: no variant per size % 16
def _relu_dropout_fwd(h_ptr, out_ptr, words_ptr, M, N, WORDS, p, scale, seed,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    quads = rows[:, None] * tl.cdiv(N, 4) + tl.program_id(1) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, quads)                                      # one Philox call per 4 elements
    keep = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_M, BLOCK_N)) >= p
    bit = (h > 0) & keep & mask
    tl.store(out_ptr + offs, tl.where(bit, h * scale, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
    bits = tl.reshape(bit.to(tl.int32), (BLOCK_M, BLOCK_N // 32, 32))
    words = tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)               # [BLOCK_M, BLOCK_N / 32]
    word_cols = tl.program_id(1) * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
    tl.store(words_ptr + rows[:, None] * WORDS + word_cols[None, :], words,
             mask=(rows[:, None] < M) & (word_cols[None, :] < WORDS))


@triton.jit
def relu_mask_tile(mask_src_ptr, rows, pid_n, M, N, WORDS,
                   FROM_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The mask of tile (rows, column block pid_n), bool [BLOCK_M, BLOCK_N]; BLOCK_N a multiple of 32.

    mask_src is the packed bits (FROM_BITS) or the saved ReLU output (mask = out > 0).
    """
    if FROM_BITS:
        word_cols = pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
        words = tl.load(mask_src_ptr + rows[:, None].to(tl.int64) * WORDS + word_cols[None, :],
                        mask=(rows[:, None] < M) & (word_cols[None, :] < WORDS), other=0)   # [BLOCK_M, BLOCK_N / 32]
        bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.load(mask_src_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                       mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0) > 0


@triton.jit(do_not_specialize=["M"])  # varies per call: no variant per size % 16
def _relu_mask_bwd(g_ptr, mask_src_ptr, d_pre_ptr, db_part_ptr, M, N, WORDS, scale,
                   FROM_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    on = relu_mask_tile(mask_src_ptr, rows, tl.program_id(1), M, N, WORDS, FROM_BITS, BLOCK_M, BLOCK_N)
    d_pre = tl.where(on, g * scale, 0.0)
    tl.store(d_pre_ptr + offs, d_pre.to(d_pre_ptr.dtype.element_ty), mask=mask)
    tl.store(db_part_ptr + pid_m * N + cols, tl.sum(d_pre, axis=0), mask=cols < N)


def _grid(m: int, n: int) -> tuple[int, int]:
    return triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)


def relu_dropout(h: torch.Tensor, p: float, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, N] contiguous -> (relu(h) * keep / (1 - p), bits int32 [M, ceil(N / 32)])."""
    m, n = h.shape
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    out = torch.empty_like(h)
    words = torch.empty((m, triton.cdiv(n, 32)), device=h.device, dtype=torch.int32)
    _relu_dropout_fwd[_grid(m, n)](h, out, words, m, n, words.shape[1], p, 1.0 / (1.0 - p), seed,
                                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out, words


def relu_mask_backward(grad: torch.Tensor, mask_src: torch.Tensor, scale: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [M, N]; mask_src: bits int32 [M, ceil(N / 32)] or the ReLU output [M, N] -> (d_pre, bias grad fp32 [N])."""
    m, n = grad.shape
    grid = _grid(m, n)
    d_pre = torch.empty_like(grad)
    db_part = torch.empty((grid[0], n), device=grad.device, dtype=torch.float32)
    from_bits = mask_src.dtype == torch.int32
    _relu_mask_bwd[grid](grad, mask_src, d_pre, db_part, m, n, mask_src.shape[1] if from_bits else 0, scale,
                         FROM_BITS=from_bits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return d_pre, db_part.sum(0)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """bits int32 [M, W] -> bool [M, n] (for tests and inspection)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :n]
