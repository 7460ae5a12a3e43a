"""Row encodings on the wire: fp32, bf16, fp16, or int8 with a per-row scale.

int8 is symmetric per row: q = round(x / s), s = absmax(row) / 127, so the
error of each element is at most s / 2.
"""
from __future__ import annotations

from typing import Literal

import torch

WireFormat = Literal["fp32", "bf16", "fp16", "int8"]
_FLOAT_WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantize_int8_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, D] float -> (q [N, D] int8, scale [N] float32)."""
    absmax = rows.detach().abs().amax(dim=1).float()
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(rows.float() / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(1)


def encode_rows(rows: torch.Tensor, wire: WireFormat) -> torch.Tensor:
    """[N, D] float32 -> one tensor to send: [N, D] in a float format, or [N, D + 4] bytes for int8."""
    if wire in _FLOAT_WIRE:
        return rows.to(_FLOAT_WIRE[wire])
    if wire != "int8":
        raise ValueError(f"unknown wire format {wire!r}; choose one of fp32, bf16, fp16, int8")
    q, scale = quantize_int8_reference(rows)
    return torch.cat([q.view(torch.uint8), scale.unsqueeze(1).view(torch.uint8)], dim=1)


def decode_rows(payload: torch.Tensor, wire: WireFormat, dim: int) -> torch.Tensor:
    """The inverse of `encode_rows`, back to float32 [N, dim]."""
    if wire in _FLOAT_WIRE:
        return payload.float()
    q = payload[:, :dim].contiguous().view(torch.int8)
    scale = payload[:, dim:].contiguous().view(torch.float32).squeeze(1)
    return dequantize_int8_reference(q, scale)
