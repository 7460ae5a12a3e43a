"""Multi-layer perceptron with bias, ReLU and dropout: the reference of FusedMLP.

`fused_mlp` is what models call. Each hidden layer is linear -> ReLU ->
dropout; the last layer's activation is optional. Under autocast the input,
weights and biases are cast to its dtype first (see dispatch.py), fused or not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import autocast_inputs, use_fused


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


class FusedMLPFunction(torch.autograd.Function):
    """All layers in one autograd node (CUDA; needs Triton).

    Forward: bias + ReLU in the cuBLASLt epilogue (`torch._addmm_activation`);
    dropout through the bitmask kernel. Backward: the GEMM that carries the
    gradient down to each hidden layer applies that layer's ReLU derivative
    (and dropout mask and scale) and sums its bias gradient in its epilogue
    (`masked_grad_matmul`); the weight gradients are cuBLAS GEMMs. Only a last
    layer with an activation takes a separate mask pass.
    """

    @staticmethod
    def forward(ctx, x, last_activation, dropout, *params):
        from .triton_dropout import relu_dropout
        num_layers = len(params) // 2
        weights, biases = params[:num_layers], params[num_layers:]
        inputs, masks = [], []
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            inputs.append(x)
            if i < num_layers - 1 or last_activation:
                x = torch._addmm_activation(bias, x, weight.t())
                if dropout > 0.0 and i < num_layers - 1:
                    x, bits = relu_dropout(x, dropout)
                    masks.append(bits)
                else:
                    masks.append(x)
            else:
                x = torch.addmm(bias, x, weight.t())
                masks.append(None)
        ctx.num_layers = num_layers
        ctx.scale = 1.0 / (1.0 - dropout)
        ctx.save_for_backward(*inputs, *weights, *[m if m is not None else torch.empty(0) for m in masks])
        ctx.has_mask = [m is not None for m in masks]
        return x

    @staticmethod
    def backward(ctx, grad):
        from .triton_dropout import relu_mask_backward
        from .triton_mlp import masked_grad_matmul
        n = ctx.num_layers
        saved = ctx.saved_tensors
        inputs, weights, masks = saved[:n], saved[n:2 * n], saved[2 * n:]
        scales = [ctx.scale if m.dtype == torch.int32 else 1.0 for m in masks]
        d_weights, d_biases, d_x = [None] * n, [None] * n, None
        grad = grad.contiguous()
        if ctx.has_mask[-1]:
            d_pre, d_bias = relu_mask_backward(grad, masks[-1], scales[-1])
        else:
            d_pre, d_bias = grad, grad.sum(0, dtype=torch.float32)
        for i in reversed(range(n)):
            d_weights[i] = d_pre.t() @ inputs[i]
            d_biases[i] = d_bias.to(weights[i].dtype)
            if i > 0:
                d_pre, d_bias = masked_grad_matmul(d_pre, weights[i], masks[i - 1], scales[i - 1])
            elif ctx.needs_input_grad[0]:
                d_x = d_pre @ weights[0]
        return d_x, None, None, *d_weights, *d_biases


def fused_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
              last_activation: bool = False, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Dispatch: `FusedMLPFunction` on CUDA (see `use_fused`), the reference otherwise."""
    num_layers = len(weights)
    x, *params = autocast_inputs(x, *weights, *biases)
    weights, biases = params[:num_layers], params[num_layers:]
    if use_fused(x) and len({x.dtype, *(p.dtype for p in params)}) == 1:
        return FusedMLPFunction.apply(x.contiguous(), last_activation, dropout if training else 0.0, *params)
    return fused_mlp_reference(x, weights, biases, last_activation, dropout, training)
