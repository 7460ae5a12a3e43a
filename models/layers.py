"""PyTorch-like layers of the zoo: FusedMLP, DotInteraction, CrossNet.

Each calls an op of `terarec.kernels`, which runs the fused GPU kernel on CUDA
and the torch reference elsewhere.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from terarec.kernels import cross_v1, cross_v2, dot_interaction, fused_mlp, interaction_output_dim


class FusedMLP(nn.Module):
    """Linear layers with bias, ReLU (and dropout) between them: [B, sizes[0]] -> [B, sizes[-1]].

    >>> FusedMLP([13, 64, 16])(torch.randn(4, 13)).shape
    torch.Size([4, 16])
    """

    def __init__(self, sizes: list[int], last_activation: bool = False, dropout: float = 0.0):
        super().__init__()
        if len(sizes) < 2 or min(sizes) <= 0:
            raise ValueError(f"FusedMLP needs at least two positive sizes, got {sizes}")
        self.sizes = list(sizes)
        self.last_activation = last_activation
        self.dropout = dropout
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layer = nn.Linear(fan_in, fan_out)
            self.weights.append(layer.weight)
            self.biases.append(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_mlp(x, list(self.weights), list(self.biases), self.last_activation, self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, last_activation={self.last_activation}, dropout={self.dropout}"


class DotInteraction(nn.Module):
    """dense [B, D], sparse [B, F, D] -> [B, D + (F+1)F/2]: pairwise dot products after the dense vector."""

    def __init__(self, self_interaction: bool = False, pad_to: int | None = None):
        super().__init__()
        self.self_interaction = self_interaction
        self.pad_to = pad_to

    def output_dim(self, dim: int, num_sparse: int) -> int:
        return interaction_output_dim(dim, num_sparse, self.self_interaction, self.pad_to)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return dot_interaction(dense, sparse, self.self_interaction, self.pad_to)


class CrossNet(nn.Module):
    """DCN cross network: `num_layers` cross layers over x0 [B, D] (v1 vector or v2 matrix form)."""

    def __init__(self, dim: int, num_layers: int, matrix: bool = False):
        super().__init__()
        self.matrix = matrix
        shape = (dim, dim) if matrix else (dim,)
        bound = 1.0 / math.sqrt(dim)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(shape).uniform_(-bound, bound)) for _ in range(num_layers))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        cross = cross_v2 if self.matrix else cross_v1
        x = x0
        for weight, bias in zip(self.weights, self.biases):
            x = cross(x0, x, weight, bias)
        return x
