"""The numeric precision of a run's dense part: fp32, tf32 or bf16.

- fp32: fp32 tensors and matmuls.
- tf32: fp32 tensors; fp32 matmuls (cuBLAS and the fused GEMMs) in TF32 on GPUs that have it.
- bf16: the forward under `torch.autocast` (CPU autocast on CPU): matmuls and the fused kernels take
  bf16 activations; parameters stay fp32 (the optimizer steps fp32 master weights) and the embedding
  rows stay fp32 in the store (the gather hands the dense part bf16 copies).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """fp32 matmuls in TF32 inside for 'tf32' (forward, backward and optimizer step); the setting before comes back after."""
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """Around a forward (not the backward): bf16 autocast on `device` for 'bf16', a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
