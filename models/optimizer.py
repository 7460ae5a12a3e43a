"""One optimizer over a model's store-backed embeddings and its dense parameters, so that a training step is
`loss.backward(); optimizer.step()` for every model (TorchRec's KeyedOptimizer plays this part for its tables).

`step` first hands each Embedding's pending row gradients to its store's sparse optimizer, in the order of the
forwards (with sharded rows these are collectives, which every worker runs in the same order), then steps the
dense optimizer. Its state is the dense optimizer's: the stores keep the sparse state beside each row.
"""
from __future__ import annotations

import torch
from torch import nn

from .embedding import Embedding


class SparseDenseOptimizer:
    """>>> optimizer = SparseDenseOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3))"""

    def __init__(self, model: nn.Module, dense: torch.optim.Optimizer | None):
        self.embeddings = [module for module in model.modules() if isinstance(module, Embedding)]
        self.dense = dense  # None: a bare Embedding, no dense parameters

    def step(self) -> None:
        for embedding in self.embeddings:
            embedding.apply_gradients()
        if self.dense is not None:
            self.dense.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.dense.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state)
