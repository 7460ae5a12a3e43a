"""When to run a fused GPU kernel instead of the torch reference, and in which precision.

Fused kernels run on CUDA tensors by default, or as a `fused_kernels(...)` block says (tests run them on CPU
tensors that way, in Triton's interpreter). Under `torch.autocast` every op here computes in the autocast
dtype, fused or not: `autocast_inputs` casts its floating inputs first, as autocast casts a matmul's operands.
The casts are autograd ops, so fp32 master weights get fp32 gradients, and each fused kernel sees one dtype in
its forward and backward.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_forced: bool | None = None  # set inside a fused_kernels block


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Within the block every dispatcher takes the fused kernels (for CPU tensors too) or, with False, the
    torch references, whatever the device and TERAREC_FUSED say."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def use_fused(tensor: torch.Tensor) -> bool:
    """Fused kernels run on CUDA tensors when Triton is installed, unless TERAREC_FUSED=0 or a
    `fused_kernels` block decides."""
    if _forced is not None:
        return _forced and triton_available()
    return tensor.is_cuda and triton_available() and os.environ.get("TERAREC_FUSED", "1") != "0"


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on `tensor`'s device, or None outside autocast."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The floating tensors cast to the autocast dtype of the first one's device; all unchanged outside autocast."""
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def tf32_matmuls() -> bool:
    """Whether fp32 matmuls may use TF32 (`torch.set_float32_matmul_precision("high")` or the fp32_precision API);
    the fused GEMMs follow cuBLAS here."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"
