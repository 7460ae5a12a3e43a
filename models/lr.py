"""Logistic regression on the same features: the linear baseline every model must beat."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .batch import Batch
from .embedding import Embedding
from .layers import LogitLinear


class LRConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogisticRegression(nn.Module):
    """logit = w . dense + sum_f weight(feature f, id) + b; the sparse weights are dim-1 store rows."""

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: LRConfig = LRConfig()):
        super().__init__()
        if embedding.dim != 1:
            raise ValueError(f"logistic regression needs embedding dim 1, got {embedding.dim}")
        self.embedding = embedding
        self.dense = LogitLinear(num_dense, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.dense(batch.dense) + self.embedding(batch.sparse).sum(dim=1)
