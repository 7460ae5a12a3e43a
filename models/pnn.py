"""PNN (Qu et al., 2016): a product layer between the embeddings and the MLP; inner (IPNN), outer (OPNN) or both (PNN*).

The product layer's output is [z, p]: z the embeddings themselves (the linear
signals), p their products; the first hidden layer applied to it is exactly the
paper's l_z + l_p + b_1 with full (undecomposed) weights. Dense features join
the product layer's output.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .batch import Batch
from .embedding import Embedding
from .layers import FusedMLP, InnerProduct, OuterProduct


class PNNConfig(BaseModel):
    """`product`: inner products of every field pair, the superposed outer product f_S f_S^T, or both."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    product: Literal["inner", "outer", "both"] = "inner"
    deep_mlp: list[int] = Field(default=[256, 128], min_length=1, description="hidden sizes after the product layer")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class PNN(nn.Module):
    """Batch -> logits [B, 1].

    v [B, F, D] -> [v flat (F*D), inner (F(F-1)/2) and/or outer (D*D), dense] -> MLP -> 1.
    """

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: PNNConfig = PNNConfig()):
        super().__init__()
        self.embedding = embedding
        self.products = nn.ModuleList()
        if config.product in ("inner", "both"):
            self.products.append(InnerProduct(num_sparse))
        if config.product in ("outer", "both"):
            self.products.append(OuterProduct(embedding.dim))
        product_dim = num_sparse * embedding.dim + sum(product.output_dim for product in self.products)
        self.deep = FusedMLP([product_dim + num_dense, *config.deep_mlp, 1], dropout=config.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        vectors = self.embedding(batch.sparse)
        signals = [vectors.flatten(1), *(product(vectors) for product in self.products), batch.dense]
        return self.deep(torch.cat(signals, dim=1))
