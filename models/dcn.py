"""Deep & Cross Network: DCN (Wang et al., 2017; vector cross layers) and DCN-V2 (Wang et al., 2021; matrix).

x0 = [embeddings, dense] feeds a cross network and a deep network, either side
by side with their outputs concatenated before the logit (`parallel`, DCN's
only form) or one after the other (`stacked`: the deep net reads the cross
network's output).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .batch import Batch
from .embedding import Embedding
from .layers import CrossNet, FusedMLP, LogitLinear, flat_input


class DCNConfig(BaseModel):
    """DCN's Criteo net is 6 cross layers beside 2 deep layers of 1024; scaled for CPU.

    `matrix` picks the cross layer: False is DCN's x0 * (x_l . w) + b + x_l,
    True is DCN-V2's x0 * (W x_l + b) + x_l.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    cross_layers: int = Field(default=3, ge=1, description="number of cross layers")
    deep_mlp: list[int] = Field(default=[256, 128], min_length=1, description="hidden sizes of the deep net")
    structure: Literal["parallel", "stacked"] = "parallel"
    matrix: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class DCNv2Config(DCNConfig):
    """DCN-V2: matrix cross layers, stacked by default (the paper's main Criteo configuration)."""

    structure: Literal["parallel", "stacked"] = "stacked"
    matrix: bool = True


class DCN(nn.Module):
    """Batch -> logits [B, 1].

    x0 = [v_1..v_F, dense] [B, d0 = F*D + num_dense];
    parallel: logit = w . [cross(x0), deep(x0)] + b; stacked: logit = deep(cross(x0)) -> 1.
    """

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: DCNConfig = DCNConfig()):
        super().__init__()
        self.embedding = embedding
        self.stacked = config.structure == "stacked"
        input_dim = num_sparse * embedding.dim + num_dense
        self.cross = CrossNet(input_dim, config.cross_layers, matrix=config.matrix)
        if self.stacked:
            self.deep = FusedMLP([input_dim, *config.deep_mlp, 1], dropout=config.dropout)
        else:
            self.deep = FusedMLP([input_dim, *config.deep_mlp], last_activation=True, dropout=config.dropout)
            self.out = LogitLinear(input_dim + config.deep_mlp[-1], 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = flat_input(self.embedding(batch.sparse), batch.dense)
        if self.stacked:
            return self.deep(self.cross(x0))
        return self.out(torch.cat([self.cross(x0), self.deep(x0)], dim=1))
