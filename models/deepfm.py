"""DeepFM (Guo et al., 2017): a factorization machine and a deep network over the same embeddings.

The FM's first-order weight of each ID rides in the same store row as its
vector: rows are D+1 wide, column 0 is the weight w_i and columns 1..D the
vector v_i, so one store and one lookup serve the FM and the deep part, and one
sparse optimizer step updates both (the paper's "shared embedding").
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .batch import Batch
from .embedding import Embedding
from .layers import FMInteraction, FusedMLP, LogitLinear, flat_input


class FirstOrderRows(nn.Module):
    """Base of models whose store rows are [w_i | v_i], D+1 wide: splits them, computes the linear term.

    The linear term is sum_i w_i over the sparse fields plus a dense linear layer
    (with the global bias): [B, 1].
    """

    def __init__(self, embedding: Embedding, num_dense: int):
        super().__init__()
        if embedding.dim < 2:
            raise ValueError(f"{type(self).__name__} stores [weight | vector] rows, so the store row width must be "
                             f"embedding.dim + 1 >= 2, got {embedding.dim}")
        self.embedding = embedding
        self.dim = embedding.dim - 1
        self.dense_linear = LogitLinear(num_dense, 1)

    def lookup(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> (linear term [B, 1], vectors [B, F, D])."""
        rows = self.embedding(batch.sparse)  # [B, F, D+1]
        linear = self.dense_linear(batch.dense) + rows[:, :, 0].sum(dim=1, keepdim=True)
        return linear, rows[:, :, 1:]


class DeepFMConfig(BaseModel):
    """`deep_mlp` are the deep part's hidden sizes (the paper's Criteo net is 400-400-400; scaled for CPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    deep_mlp: list[int] = Field(default=[256, 128], description="hidden sizes of the deep part")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class DeepFM(FirstOrderRows):
    """Batch -> logits [B, 1] = FM(first order + second order) + DNN.

    rows [B, F, D+1] -> w [B, F], v [B, F, D];
    FM = w0 + dense . w_dense + sum_i w_i + sum_{i<j} <v_i, v_j>;
    DNN = MLP([v_1..v_F, dense] [B, F*D + num_dense] -> deep_mlp -> 1).
    """

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: DeepFMConfig = DeepFMConfig()):
        super().__init__(embedding, num_dense)
        self.fm = FMInteraction()
        self.deep = FusedMLP([num_sparse * self.dim + num_dense, *config.deep_mlp, 1], dropout=config.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        linear, vectors = self.lookup(batch)
        return linear + self.fm(vectors) + self.deep(flat_input(vectors, batch.dense))
