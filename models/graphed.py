"""The dense part of a training step as CUDA graphs: one replay for its forward and one for its backward.

With embedding rows on the GPU, a bf16 DLRM step at batch 64k keeps the H200 busy for ~4.6 ms but took ~8.7 ms:
the host launching some 200 small kernels (casts, GEMMs, fused epilogues, the optimizer) was the bound. What
follows the lookup has fixed shapes for a fixed batch (`model.head(dense, rows)`), so it is captured once
(`torch.cuda.make_graphed_callables`: autograd sees one node whose forward and backward are graph replays)
and replayed each step; the lookup, with its data-dependent sizes, stays eager. Parameters are read and their
gradients written at fixed addresses, so in-place optimizers and checkpoint loads (which copy into the
parameters) need nothing more. Dropout is left eager: a captured kernel would replay one mask for ever.
"""
from __future__ import annotations

import torch
from torch import nn

from .embedding import Embedding


class _Head(nn.Module):
    """The model's parts after the lookup, as a module of their own (for the capture's parameter list)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(m for m in model.children() if not isinstance(m, Embedding))
        self.run = model.head

    def forward(self, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.run(dense, rows)


def graphable(model: nn.Module) -> bool:
    """Whether `model` has a head to capture and nothing in it that must differ between replays (dropout)."""
    if not hasattr(model, "head"):
        return False
    return all(getattr(m, "dropout", 0.0) in (0.0, None) and not isinstance(m, nn.Dropout) for m in model.modules())


class GraphedHead:
    """`model.head` replayed from CUDA graphs for inputs shaped like the ones it was captured with.

    Captured on the current stream's device under the caller's autocast state; call it under the same state
    (autocast with its cast cache off, see kernels/precision.py), in training mode.
    """

    def __init__(self, model: nn.Module, dense: torch.Tensor, rows: torch.Tensor):
        self.shapes = (dense.shape, dense.dtype, rows.shape, rows.dtype)
        head = _Head(model)
        sample = (dense.detach().clone(), rows.detach().clone().requires_grad_(rows.requires_grad))
        self.replay = torch.cuda.make_graphed_callables(head, sample, num_warmup_iters=3)

    def fits(self, dense: torch.Tensor, rows: torch.Tensor) -> bool:
        return self.shapes == (dense.shape, dense.dtype, rows.shape, rows.dtype)

    def __call__(self, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.replay(dense, rows)
