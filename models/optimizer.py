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
    """The dense optimizer, plus the sparse updates of every Embedding in `model`.

    >>> from terarec.models import DLRM, Batch, Embedding
    >>> from terarec.store import DeviceStore, SparseAdagrad
    >>> model = DLRM(Embedding(DeviceStore(dim=16, optimizer=SparseAdagrad(lr=0.1))), num_dense=13, num_sparse=26)
    >>> optimizer = SparseDenseOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    >>> batch = Batch(torch.rand(4, 13), torch.randint(0, 100, (4, 26)), torch.ones(4, 1))
    >>> torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels).backward()
    >>> optimizer.step()  # the store's rows, then the dense parameters
    """

    def __init__(self, model: nn.Module, dense: torch.optim.Optimizer | None):
        self.embeddings = [module for module in model.modules() if isinstance(module, Embedding)]
        self.dense = dense  # None: a bare Embedding, no dense parameters

    def step(self) -> None:
        for embedding in self.embeddings:
            embedding.apply_gradients()
        if self.dense is not None:
            self.dense.step()

    @property
    def param_groups(self) -> list[dict]:
        """The dense optimizer's groups (an lr schedule sets their lr)."""
        return self.dense.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.dense.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state)
