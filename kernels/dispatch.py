"""When to run a fused GPU kernel instead of the torch reference."""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(tensor: torch.Tensor) -> bool:
    """Fused kernels run on CUDA tensors when Triton is installed, unless TERAREC_FUSED=0."""
    return tensor.is_cuda and triton_available() and os.environ.get("TERAREC_FUSED", "1") != "0"
