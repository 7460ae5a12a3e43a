"""Multi-layer perceptron with bias, ReLU and dropout: the reference of FusedMLP.

`fused_mlp` is what models call. Each hidden layer is linear -> ReLU ->
dropout; the last layer's activation is optional.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_mlp_reference(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                        last_activation: bool = False, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """x [B, in] -> [B, out]; weights[i] [out_i, in_i], biases[i] [out_i]."""
    last = len(weights) - 1
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        x = F.linear(x, weight, bias)
        if i < last or last_activation:
            x = F.relu(x)
            if dropout > 0.0 and i < last:
                x = F.dropout(x, dropout, training)
    return x


def fused_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
              last_activation: bool = False, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    return fused_mlp_reference(x, weights, biases, last_activation, dropout, training)
