"""Sparse optimizers whose state lives beside each row.

A store keeps each embedding as one wide value `[row | state_0 | state_1 ...]`
(each part `dim` wide), so every tier moves a row and its optimizer state
together. Optimizers are functions of (values, grads, step): a tier gathers the
values of the keys in a batch, calls `apply`, and scatters them back; on CUDA the
fused kernel (kernels/triton_sparse_update.py) runs the same formulas in place,
given the optimizer's `kind` and `fused_args(step)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from terarec.kernels.dispatch import use_fused


@dataclass(frozen=True)
class SparseSGD:
    lr: float = 0.01
    state_names: tuple[str, ...] = ()
    kind: ClassVar[str] = "sgd"

    def apply(self, values: torch.Tensor, grads: torch.Tensor, step: int) -> torch.Tensor:
        """values [N, dim]; grads [N, dim] summed per unique key -> new values."""
        return values - self.lr * grads

    def fused_args(self, step: int) -> dict[str, float]:
        return {"lr": self.lr}


@dataclass(frozen=True)
class SparseAdagrad:
    """torch.optim.Adagrad restricted to the rows that got a gradient (identical for those rows)."""

    lr: float = 0.01
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    state_names: tuple[str, ...] = ("sum",)
    kind: ClassVar[str] = "adagrad"

    def apply(self, values: torch.Tensor, grads: torch.Tensor, step: int) -> torch.Tensor:
        dim = grads.shape[1]
        rows, state_sum = values[:, :dim], values[:, dim:]
        state_sum = state_sum + grads * grads
        rows = rows - self.lr * grads / (state_sum.sqrt() + self.eps)
        return torch.cat([rows, state_sum], dim=1)

    def fused_args(self, step: int) -> dict[str, float]:
        return {"lr": self.lr, "eps": self.eps}


@dataclass(frozen=True)
class SparseAdam:
    """torch.optim.SparseAdam: moments of a row move only when it gets a gradient; `step` is global."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    state_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    kind: ClassVar[str] = "adam"

    def step_size(self, step: int) -> float:
        """lr with both moments' bias corrections folded in."""
        return self.lr * math.sqrt(1 - self.beta2**step) / (1 - self.beta1**step)

    def apply(self, values: torch.Tensor, grads: torch.Tensor, step: int) -> torch.Tensor:
        dim = grads.shape[1]
        rows, exp_avg, exp_avg_sq = values[:, :dim], values[:, dim:2 * dim], values[:, 2 * dim:]
        exp_avg = exp_avg + (grads - exp_avg) * (1 - self.beta1)
        exp_avg_sq = exp_avg_sq + (grads * grads - exp_avg_sq) * (1 - self.beta2)
        rows = rows - self.step_size(step) * exp_avg / (exp_avg_sq.sqrt() + self.eps)
        return torch.cat([rows, exp_avg, exp_avg_sq], dim=1)

    def fused_args(self, step: int) -> dict[str, float]:
        return {"lr": self.step_size(step), "eps": self.eps, "keep1": 1 - self.beta1, "keep2": 1 - self.beta2}


SparseOptimizer = SparseSGD | SparseAdagrad | SparseAdam
OPTIMIZERS = {cls.kind: cls for cls in (SparseSGD, SparseAdagrad, SparseAdam)}


def make_sparse_optimizer(name: str, lr: float) -> SparseOptimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown sparse optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr=lr)


def apply_in_place(values: torch.Tensor, slots: torch.Tensor, grads: torch.Tensor, optimizer: SparseOptimizer,
                   step: int) -> None:
    """One optimizer step on the rows `values[slots]` ([capacity, value_width], slots [N] unique, grads [N, dim]):
    the fused Triton kernel on CUDA, gather-apply-scatter with the torch reference elsewhere."""
    if use_fused(values):
        from terarec.kernels.triton_sparse_update import sparse_update_
        sparse_update_(values, slots, grads, optimizer.kind, **optimizer.fused_args(step))
    else:
        values[slots] = optimizer.apply(values[slots], grads, step)


def initial_state(optimizer: SparseOptimizer, rows: torch.Tensor) -> torch.Tensor:
    """Rows [N, dim] -> values [N, dim * (1 + states)] with each state at its initial value."""
    fill = getattr(optimizer, "initial_accumulator_value", 0.0)
    states = rows.new_full((rows.shape[0], rows.shape[1] * len(optimizer.state_names)), fill)
    return torch.cat([rows, states], dim=1)
