"""Multi-layer perceptron with bias, ReLU and dropout: the reference of FusedMLP.

`fused_mlp` is what models call. Each hidden layer is linear -> ReLU ->
dropout; the last layer's activation is optional.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_fused


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
    dropout through the bitmask kernel. Backward, per layer: one fused pass
    applies the ReLU derivative (and dropout mask and scale) and sums the bias
    gradient, then two GEMMs give the weight and input gradients.
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
        n = ctx.num_layers
        saved = ctx.saved_tensors
        inputs, weights, masks = saved[:n], saved[n:2 * n], saved[2 * n:]
        d_weights, d_biases = [None] * n, [None] * n
        grad = grad.contiguous()
        for i in reversed(range(n)):
            if ctx.has_mask[i]:
                scale = ctx.scale if masks[i].dtype == torch.int32 else 1.0
                d_pre, d_bias = relu_mask_backward(grad, masks[i], scale)
            else:
                d_pre, d_bias = grad, grad.sum(0, dtype=torch.float32)
            d_weights[i] = d_pre.t() @ inputs[i]
            d_biases[i] = d_bias.to(weights[i].dtype)
            if i > 0 or ctx.needs_input_grad[0]:
                grad = d_pre @ weights[i]
        return (grad if ctx.needs_input_grad[0] else None), None, None, *d_weights, *d_biases


def fused_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
              last_activation: bool = False, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Dispatch: `FusedMLPFunction` on CUDA (see `use_fused`), the reference otherwise."""
    if use_fused(x) and len({x.dtype, *(w.dtype for w in weights), *(b.dtype for b in biases)}) == 1:
        return FusedMLPFunction.apply(x.contiguous(), last_activation, dropout if training else 0.0,
                                      *weights, *biases)
    return fused_mlp_reference(x, weights, biases, last_activation, dropout, training)
