"""Dot feature interaction (DLRM): pairwise dot products of the feature vectors.

`dot_interaction` is the entry point the models call; it runs the fused Triton
kernel on CUDA when one is registered and the torch reference elsewhere. Under
autocast both inputs are cast to its dtype first (see dispatch.py).
"""
from __future__ import annotations

import torch

from .dispatch import autocast_inputs, use_fused


def interaction_pairs(num_vectors: int, self_interaction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices of the lower triangle (row-major: (1,0), (2,0), (2,1), ...)."""
    rows, cols = torch.tril_indices(num_vectors, num_vectors, offset=0 if self_interaction else -1)
    return rows, cols


def interaction_output_dim(dim: int, num_sparse: int, self_interaction: bool = False, pad_to: int | None = None) -> int:
    """Width of `dot_interaction`'s output: the dense vector, the pairs, then zero padding."""
    n = num_sparse + 1
    width = dim + (n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2)
    if pad_to:
        width = -(-width // pad_to) * pad_to
    return width


def dot_interaction_reference(dense: torch.Tensor, sparse: torch.Tensor, self_interaction: bool = False,
                              pad_to: int | None = None) -> torch.Tensor:
    """dense [B, D], sparse [B, F, D] -> [B, D + pairs (+ zero pad)].

    The F + 1 vectors are [dense, sparse_0, ..., sparse_{F-1}]; pairs are their
    dot products over the lower triangle (without the diagonal unless
    self_interaction), concatenated after the dense vector.
    """
    vectors = torch.cat([dense.unsqueeze(1), sparse], dim=1)            # [B, F+1, D]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))                  # [B, F+1, F+1]
    rows, cols = interaction_pairs(vectors.shape[1], self_interaction)
    out = torch.cat([dense, gram[:, rows, cols]], dim=1)
    width = interaction_output_dim(dense.shape[1], sparse.shape[1], self_interaction, pad_to)
    if width > out.shape[1]:
        out = torch.nn.functional.pad(out, (0, width - out.shape[1]))
    return out


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor, self_interaction: bool = False,
                    pad_to: int | None = None) -> torch.Tensor:
    """Dispatch: the fused Triton kernel on CUDA (see `use_fused`), the reference otherwise."""
    dense, sparse = autocast_inputs(dense, sparse)
    if use_fused(dense) and dense.dtype == sparse.dtype:
        from .triton_interaction import FusedDotInteraction
        return FusedDotInteraction.apply(dense, sparse, self_interaction, pad_to)
    return dot_interaction_reference(dense, sparse, self_interaction, pad_to)
