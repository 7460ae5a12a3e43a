"""The backward GEMM of FusedMLP with the ReLU(/dropout) derivative and the bias gradient in its epilogue.

Going down one layer, the gradient at hidden layer i's pre-activation is
d_pre_i = (d_pre_{i+1} @ W_{i+1}) * mask_i * scale: the GEMM that carries the
gradient down applies layer i's mask (packed dropout bits or the saved ReLU
output, see triton_dropout.py) and scale to each output tile before storing
it, and writes the tile's column sums, the bias gradient's partials. d_pre_i
is written once and read by cuBLAS for the weight gradient and the next GEMM;
no separate elementwise pass runs. For a narrow first layer (the 13 dense
features of DLRM) the epilogue also adds the tile's share of that layer's
weight gradient d_pre_0^T @ x, and d_pre_0 need not be stored at all.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_dropout import relu_mask_tile

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 64 if INTERPRET else 128   # one for every config: the bias partials have a row per row block
MAX_X_WIDTH = 32                     # first layers this narrow get their weight gradient in the epilogue

if INTERPRET:
    CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})]
else:
    CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
               for bn, bk, s, w in ((128, 32, 3, 8), (256, 32, 3, 8), (64, 32, 4, 4))]


@triton.autotune(configs=CONFIGS, key=["N", "K", "FROM_BITS", "PRECISION", "X_WIDTH", "STORE"],
                 reset_to_zero=["dw_ptr"])
@triton.jit
def _masked_grad_matmul(g_ptr, wt_ptr, mask_src_ptr, d_pre_ptr, db_part_ptr, x_ptr, dw_ptr, M, N, WORDS, scale,
                        X_IN, K: tl.constexpr, X_WIDTH: tl.constexpr, STORE: tl.constexpr,
                        FROM_BITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """g [M, K] @ wt[N, K]^T -> masked, scaled d_pre [M, N] (if STORE); column sums to db_part[row block, N];
    if X_WIDTH > 0, dw [N, X_IN] += d_pre^T @ x [M, X_IN] (fp32, atomically; X_WIDTH is X_IN padded).

    K, a layer width, is a compile-time constant (the interpreter cannot loop to a runtime bound).
    """
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)                                          # GROUP_M row blocks share wt in L2
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    g_tile = g_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]                 # [BLOCK_M, BLOCK_K]
    wt_tile = wt_ptr + cols[:, None] * K + ks[None, :]                            # [BLOCK_N, BLOCK_K], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = ks[None, :] < K - k0
        g = tl.load(g_tile, mask=(rows[:, None] < M) & in_k, other=0.0)
        wt = tl.load(wt_tile, mask=(cols[:, None] < N) & in_k, other=0.0)
        if UPCAST:                                                                # the interpreter's bf16 dot is wrong
            g, wt = g.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(g, tl.trans(wt), acc, input_precision=PRECISION)
        g_tile += BLOCK_K
        wt_tile += BLOCK_K
    on = relu_mask_tile(mask_src_ptr, rows, pid_n, M, N, WORDS, FROM_BITS, BLOCK_M, BLOCK_N)
    d_pre = tl.where(on, acc * scale, 0.0).to(d_pre_ptr.dtype.element_ty)        # rounded as cuBLAS would read it
    if STORE:
        tl.store(d_pre_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], d_pre,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))
    tl.store(db_part_ptr + pid_m * N + cols, tl.sum(d_pre.to(tl.float32), axis=0), mask=cols < N)
    if X_WIDTH > 0:
        xs = tl.arange(0, X_WIDTH)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * X_IN + xs[None, :],
                    mask=(rows[:, None] < M) & (xs[None, :] < X_IN), other=0.0)
        if UPCAST:
            d_pre, x = d_pre.to(tl.float32), x.to(tl.float32)
        dw = tl.dot(tl.trans(d_pre), x.to(d_pre.dtype), input_precision=PRECISION)   # [BLOCK_N, X_WIDTH]
        tl.atomic_add(dw_ptr + cols[:, None] * X_IN + xs[None, :], dw,
                      mask=(cols[:, None] < N) & (xs[None, :] < X_IN))


def masked_grad_matmul(grad: torch.Tensor, weight: torch.Tensor, mask_src: torch.Tensor, scale: float = 1.0,
                       x: torch.Tensor | None = None, store: bool = True
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """grad [M, K] @ weight [K, N], times the mask and scale -> (d_pre [M, N], bias grad fp32 [N], d_w).

    mask_src: bits int32 [M, ceil(N / 32)] or the ReLU output [M, N], as in `relu_mask_backward`.
    x [M, in] (in <= MAX_X_WIDTH), the first layer's input, if given: d_w = d_pre^T @ x, fp32 [N, in], summed
    across row blocks with atomics (else None). store=False skips writing d_pre (returned as None).
    fp32 operands follow torch's TF32 setting (`torch.backends.cuda.matmul.allow_tf32`).
    """
    if grad.shape[1] % 16:                  # rows of 16 elements: unpadded, K = 1 in fp16 crashed on the H100
        pad = 16 - grad.shape[1] % 16
        grad, weight = F.pad(grad, (0, pad)), F.pad(weight, (0, 0, 0, pad))
    m, k = grad.shape
    n = weight.shape[1]
    d_pre = torch.empty((m, n), device=grad.device, dtype=grad.dtype) if store else grad.new_empty(0)
    db_part = torch.empty((triton.cdiv(m, BLOCK_M), n), device=grad.device, dtype=torch.float32)
    x_in = 0 if x is None else x.shape[1]
    x = grad.new_empty(0) if x is None else x.contiguous()
    d_w = torch.zeros((n, x_in), device=grad.device, dtype=torch.float32)
    from_bits = mask_src.dtype == torch.int32
    tf32 = grad.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET
    grid = lambda meta: (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, meta["BLOCK_N"]),)
    _masked_grad_matmul[grid](grad, weight.t().contiguous(), mask_src, d_pre, db_part, x, d_w, m, n,
                              mask_src.shape[1] if from_bits else 0, scale, x_in,
                              K=k, X_WIDTH=max(16, triton.next_power_of_2(x_in)) if x_in else 0, STORE=store,
                              FROM_BITS=from_bits, PRECISION="tf32" if tf32 else "ieee", UPCAST=INTERPRET,
                              BLOCK_M=BLOCK_M)
    return (d_pre if store else None), db_part.sum(0), (d_w if x_in else None)
