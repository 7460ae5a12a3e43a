"""PyTorch-like layers of the zoo: FusedMLP, DotInteraction, CrossNet, LogitLinear.

Each calls an op of `terarec.kernels`, which runs the fused GPU kernel on CUDA
and the torch reference elsewhere. Layers that end in a logit compute that last projection in fp32 even under
bf16 autocast (`fp32_linear`): a bf16 logit takes only 128 values between 1 and 2, and the ties it makes among
an evaluation's predictions cost AUC (0.001-0.003 on the quickstart data), as mixed-precision recipes keep the
output layer and the loss in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from terarec.kernels import cross_v1, cross_v2, dot_interaction, fused_mlp, interaction_output_dim
from terarec.kernels.dispatch import autocast_dtype


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp32 whatever the autocast state (the weights are fp32 masters already)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight, bias)


class LogitLinear(nn.Linear):
    """nn.Linear for a projection to logits: fp32 under autocast too (see the module's note)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_linear(x, self.weight, self.bias)


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

    def pad_input(self, width: int) -> None:
        """Widen the input to `width` columns with zero weights, for inputs whose extra columns are zero padding:
        the same function and the same initial draw as the unpadded layer's."""
        first = self.weights[0]
        self.weights[0] = nn.Parameter(F.pad(first.detach(), (0, width - first.shape[1])))
        self.sizes[0] = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases = list(self.weights), list(self.biases)
        if self.sizes[-1] != 1 or self.last_activation or autocast_dtype(x) is None:
            return fused_mlp(x, weights, biases, self.last_activation, self.dropout, self.training)
        # a logit under autocast: the hidden layers fused in the autocast dtype, the projection to 1 in fp32
        if len(weights) > 1:
            x = fused_mlp(x, weights[:-1], biases[:-1], True, self.dropout, self.training)
            # the dropout the whole fused MLP applies after its last hidden layer, which the call above ends at
            x = F.dropout(x, self.dropout, self.training) if self.dropout > 0.0 else x
        return fp32_linear(x, weights[-1], biases[-1])

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
    """DCN cross network: `num_layers` cross layers over x0 [B, D] (v1 vector or v2 matrix form).

    Kernels start Glorot-normal as in DeepCTR-Torch's and torchrec's cross networks: std sqrt(2 / (fan_in +
    fan_out)), 1/sqrt(D) for the D x D matrix and sqrt(2 / (D + 1)) for the vector (a D x 1 kernel); biases zero.
    """

    def __init__(self, dim: int, num_layers: int, matrix: bool = False):
        super().__init__()
        self.matrix = matrix

        def glorot_kernel() -> torch.Tensor:
            kernel = nn.init.xavier_normal_(torch.empty(dim, dim if matrix else 1))
            return kernel if matrix else kernel.squeeze(1)

        self.weights = nn.ParameterList(nn.Parameter(glorot_kernel()) for _ in range(num_layers))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        cross = cross_v2 if self.matrix else cross_v1
        x = x0
        for weight, bias in zip(self.weights, self.biases):
            x = cross(x0, x, weight, bias)
        return x


def flat_input(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """sparse [B, F, D], dense [B, num_dense] -> [B, F*D + num_dense]: the input of a deep part."""
    return torch.cat([sparse.flatten(1), dense], dim=1)


class FMInteraction(nn.Module):
    """Factorization machine second-order term (Rendle, 2010): [B, F, D] -> [B, 1].

    sum_{i<j} <v_i, v_j> = 0.5 * sum_d ((sum_i v_id)^2 - sum_i v_id^2), in O(F*D).

    >>> FMInteraction()(torch.ones(2, 3, 4))
    tensor([[12.],
            [12.]])
    """

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(dim=1).square()
        sum_of_square = fields.square().sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)


class CIN(nn.Module):
    """Compressed Interaction Network of xDeepFM (Lian et al., 2018): [B, m, D] -> [B, output_dim].

    Layer k maps X^{k-1} [B, H_{k-1}, D] and X^0 [B, m, D] to
    X^k_h = act(sum_{i,j} W^{k,h}_{ij} (X^{k-1}_i * X^0_j)), W^k of shape [H_k, H_{k-1} * m];
    each layer's feature maps are sum-pooled over D and concatenated. With `split_half`
    (the authors' code) every layer but the last sends half of its maps to the output
    and the other half to the next layer.

    >>> CIN(num_fields=5, layer_sizes=[8, 4])(torch.randn(2, 5, 3)).shape
    torch.Size([2, 8])
    """

    def __init__(self, num_fields: int, layer_sizes: list[int], split_half: bool = True, activation: str = "identity"):
        super().__init__()
        if not layer_sizes or min(layer_sizes) <= 0:
            raise ValueError(f"CIN needs at least one positive layer size, got {layer_sizes}")
        if split_half and any(size % 2 for size in layer_sizes[:-1]):
            raise ValueError(f"CIN layer sizes must be even (but the last) with split_half, got {layer_sizes}")
        if activation not in ("identity", "relu"):
            raise ValueError(f"CIN activation must be 'identity' or 'relu', got {activation!r}")
        self.num_fields = num_fields
        self.layer_sizes = list(layer_sizes)
        self.split_half = split_half
        self.activation = activation
        self.weights = nn.ParameterList()
        hidden = num_fields
        self.output_dim = 0
        for k, size in enumerate(layer_sizes):
            fan_in = hidden * num_fields
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(size, fan_in).uniform_(-bound, bound)))
            last = k == len(layer_sizes) - 1
            hidden = size // 2 if split_half and not last else size
            self.output_dim += size - hidden if split_half and not last else size

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        batch, num_fields, dim = x0.shape
        x0 = x0.transpose(1, 2).contiguous()  # [B, D, m]: every layer is then one GEMM over B*D rows
        hidden, pooled = x0, []
        for k, weight in enumerate(self.weights):
            # outer products as a batched GEMM: its backward is two GEMMs, not broadcast products and sums
            z = torch.bmm(hidden.reshape(-1, hidden.shape[2], 1), x0.reshape(-1, 1, num_fields))
            z = z.reshape(batch, dim, -1)  # [B, D, H_{k-1} * m]
            maps = nn.functional.linear(z, weight)  # [B, D, H_k]
            if self.activation == "relu":
                maps = torch.relu(maps)
            if self.split_half and k < len(self.weights) - 1:
                hidden, direct = maps.split(maps.shape[2] // 2, dim=2)
            else:
                hidden = direct = maps
            pooled.append(direct.sum(dim=1))
        return torch.cat(pooled, dim=1)

    def extra_repr(self) -> str:
        return (f"num_fields={self.num_fields}, layer_sizes={self.layer_sizes}, split_half={self.split_half}, "
                f"activation={self.activation}")


class InnerProduct(nn.Module):
    """PNN's inner products: [B, F, D] -> [B, F(F-1)/2], <f_i, f_j> for every pair i < j.

    >>> InnerProduct(4)(torch.ones(2, 4, 3)).shape
    torch.Size([2, 6])
    """

    def __init__(self, num_fields: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("pairs", rows * num_fields + cols, persistent=False)  # into the flat [F, F] Gram
        self.output_dim = rows.numel()

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(fields, fields.transpose(1, 2))  # [B, F, F]
        return gram.flatten(1)[:, self.pairs]


class OuterProduct(nn.Module):
    """PNN's outer products by superposition (Qu et al., 2016, eq. 14): [B, F, D] -> [B, D*D].

    p = f_S f_S^T with f_S = sum_i f_i, which the first hidden layer weights as W_p ⊙ p.

    >>> OuterProduct(3).output_dim
    9
    """

    def __init__(self, dim: int):
        super().__init__()
        self.output_dim = dim * dim

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        field_sum = fields.sum(dim=1)  # [B, D]
        return (field_sum.unsqueeze(2) * field_sum.unsqueeze(1)).flatten(1)
