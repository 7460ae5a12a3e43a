"""Row encodings on the wire: fp32, bf16, fp16, or int8 with a per-row scale.

int8 is symmetric per row: q = round(x / s), s = max(absmax(row) / 127, tiny),
so the error of each element is at most s / 2 (`tiny`, the smallest normal
float32, keeps s normal for zero and subnormal rows). On CUDA the fused Triton
kernels of triton_quant.py encode and decode; the torch reference here is their
oracle and the CPU path. NaN or Inf cannot be carried in int8: encoding such
rows raises ValueError.
"""
from __future__ import annotations

from typing import Literal

import torch

from .dispatch import use_fused

WireFormat = Literal["fp32", "bf16", "fp16", "int8"]
_FLOAT_WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE_BYTES = 4  # the float32 scale rides at the end of each int8 row
TINY = torch.finfo(torch.float32).tiny


def check_finite_rows(bad_rows: int, total_rows: int) -> None:
    """The one error for rows int8 cannot carry (used by the reference and the kernel)."""
    if bad_rows:
        raise ValueError(f"int8 quantization got {bad_rows} of {total_rows} rows with NaN or Inf values; "
                         "the embeddings or their gradients diverged (lower the learning rate), or send them "
                         "in a float format (embedding.comm_dtype / grad_comm_dtype = fp32, bf16 or fp16)")


def quantize_int8_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, D] float -> (q [N, D] int8, scale [N] float32). Raises ValueError on NaN or Inf."""
    absmax = rows.detach().abs().amax(dim=1).float()
    check_finite_rows(int((~torch.isfinite(absmax)).sum()), rows.shape[0])
    scale = (absmax / 127.0).clamp_min_(TINY)
    q = torch.round(rows.float() / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [N, D] int8, scale [N]) -> [N, D] float32."""
    return q.float() * scale.unsqueeze(1)


def encode_rows(rows: torch.Tensor, wire: WireFormat) -> torch.Tensor:
    """[N, D] float32 -> one tensor to send: [N, D] in a float format, or [N, D + 4] bytes for int8."""
    if wire in _FLOAT_WIRE:
        return rows.to(_FLOAT_WIRE[wire])
    if wire != "int8":
        raise ValueError(f"unknown wire format {wire!r}; choose one of fp32, bf16, fp16, int8")
    if use_fused(rows):
        from .triton_quant import quantize_rows
        return quantize_rows(rows)
    q, scale = quantize_int8_reference(rows)
    return torch.cat([q.view(torch.uint8), scale.unsqueeze(1).view(torch.uint8)], dim=1)


def decode_rows(payload: torch.Tensor, wire: WireFormat, dim: int) -> torch.Tensor:
    """The inverse of `encode_rows`, back to float32 [N, dim]."""
    if wire in _FLOAT_WIRE:
        return payload.float()
    if use_fused(payload):
        from .triton_quant import dequantize_rows
        return dequantize_rows(payload, dim)
    q = payload[:, :dim].contiguous().view(torch.int8)
    scale = payload[:, dim:].contiguous().view(torch.float32).squeeze(1)
    return dequantize_int8_reference(q, scale)
