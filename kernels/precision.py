"""The numeric precision of a run's dense part: fp32, tf32 or bf16.

- fp32: fp32 tensors and matmuls.
- tf32: fp32 tensors; fp32 matmuls (cuBLAS and the fused GEMMs) in TF32 on GPUs that have it.
- bf16: the forward under `torch.autocast` (CPU autocast on CPU): matmuls and the fused kernels take
  bf16 activations; parameters stay fp32 (the optimizer steps fp32 master weights) and the embedding
  rows stay fp32 in the store (the gather hands the dense part bf16 copies).

No fp32 islands beyond that (and the fp32 loss on fp32 logits): on DLRM (CPU study, 600k synthetic rows,
300 steps x 2048, seeds 0-2) bf16 - fp32 AUC was -0.005 to +0.013 per seed, the spread of fp32 itself
started from dense weights perturbed by 2**-8 (-0.003 to +0.011; 2**-20: within 0.001); the interaction or
the logit layer in fp32 did not narrow it (-0.002 to +0.009, -0.004 to +0.012). One seed's gap measures
how far two runs part ways, not a loss in one op: compare means over seeds.
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
    """Around a forward (not the backward): bf16 autocast on `device` for 'bf16', a no-op otherwise.

    Its cast cache is off: the fused ops cast their own inputs (kernels/dispatch.py), and a CUDA-graph
    replay of the forward (models/graphed.py) must not meet casts cached outside the graph."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)
