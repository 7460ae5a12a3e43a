"""Cross feature interaction (DCN): the cross layer in its v1 vector and v2 matrix forms.

v1: x_{l+1} = x0 * (x_l . w) + b + x_l        w, b: [D]
v2: x_{l+1} = x0 * (x_l W^T + b) + x_l        W: [D, D], b: [D]
"""
from __future__ import annotations

import torch

from .dispatch import use_fused


def cross_v1_reference(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x0, xl: [B, D]; weight, bias: [D] -> [B, D]."""
    return x0 * (xl @ weight).unsqueeze(1) + bias + xl


def cross_v2_reference(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x0, xl: [B, D]; weight: [D, D]; bias: [D] -> [B, D]."""
    return x0 * torch.nn.functional.linear(xl, weight, bias) + xl


def _fusable(*tensors: torch.Tensor) -> bool:
    return use_fused(tensors[0]) and len({t.dtype for t in tensors}) == 1


def cross_v1(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Dispatch: the fused Triton kernels on CUDA (see `use_fused`), the reference otherwise."""
    if _fusable(x0, xl, weight, bias):
        from .triton_cross import FusedCrossV1
        return FusedCrossV1.apply(x0, xl, weight, bias)
    return cross_v1_reference(x0, xl, weight, bias)


def cross_v2(x0: torch.Tensor, xl: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Dispatch: the fused Triton kernels on CUDA (see `use_fused`), the reference otherwise."""
    if _fusable(x0, xl, weight, bias):
        from .triton_cross import FusedCrossV2
        return FusedCrossV2.apply(x0, xl, weight, bias)
    return cross_v2_reference(x0, xl, weight, bias)
