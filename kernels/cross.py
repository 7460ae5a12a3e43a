"""Cross feature interaction (DCN): the cross layer in its v1 vector and v2 matrix forms.

v1: x_{l+1} = x0 * (x_l . w) + b + x_l        w, b: [D]
v2: x_{l+1} = x0 * (x_l W^T + b) + x_l        W: [D, D], b: [D]

Under autocast all four inputs are cast to its dtype first (see dispatch.py).
"""
from __future__ import annotations

import torch

from .dispatch import autocast_inputs, use_fused


def cross_v1_reference(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x0, xl: [B, D]; weight, bias: [D] -> [B, D]."""
    return x0 * (xl @ weight).unsqueeze(1) + bias + xl


def cross_v2_reference(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x0, xl: [B, D]; weight: [D, D]; bias: [D] -> [B, D]."""
    return x0 * torch.nn.functional.linear(xl, weight, bias) + xl


def _cross(matrix: bool, x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    inputs = autocast_inputs(x0, xl, weight, bias)
    if use_fused(x0) and len({t.dtype for t in inputs}) == 1:
        from .triton_cross import FusedCrossV1, FusedCrossV2
        return (FusedCrossV2 if matrix else FusedCrossV1).apply(*inputs)
    return (cross_v2_reference if matrix else cross_v1_reference)(*inputs)


def cross_v1(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Dispatch: the fused Triton kernels on CUDA (see `use_fused`), the reference otherwise."""
    return _cross(False, x0, xl, weight, bias)


def cross_v2(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Dispatch: the fused Triton kernels on CUDA (see `use_fused`), the reference otherwise."""
    return _cross(True, x0, xl, weight, bias)
