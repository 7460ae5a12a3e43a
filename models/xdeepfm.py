"""xDeepFM (Lian et al., 2018): linear terms, a Compressed Interaction Network and a DNN over shared embeddings.

Store rows are [w_i | v_i], D+1 wide, as in DeepFM: the first-order weights of
the linear part ride beside the vectors (see `FirstOrderRows`).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .batch import Batch
from .deepfm import FirstOrderRows
from .embedding import Embedding
from .layers import CIN, FusedMLP, LogitLinear, flat_input


class XDeepFMConfig(BaseModel):
    """The paper's Criteo setting is CIN 200-200-200 and DNN 400-400; scaled for CPU.

    `cin_layers` are the feature maps H_k per CIN layer (even, but the last, with `cin_split_half`);
    `cin_activation` is the paper's identity by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    cin_layers: list[int] = Field(default=[128, 128], min_length=1, description="feature maps per CIN layer")
    cin_split_half: bool = True
    cin_activation: Literal["identity", "relu"] = "identity"
    deep_mlp: list[int] = Field(default=[256, 128], description="hidden sizes of the DNN")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class XDeepFM(FirstOrderRows):
    """Batch -> logits [B, 1] = linear + w_cin . CIN(v) + DNN([v, dense]).

    rows [B, F, D+1] -> w [B, F], v [B, F, D]; CIN(v) [B, sum of output maps]
    -> a bias-free output unit; DNN over [B, F*D + num_dense] ends in 1 logit.
    """

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: XDeepFMConfig = XDeepFMConfig()):
        super().__init__(embedding, num_dense)
        self.cin = CIN(num_sparse, config.cin_layers, config.cin_split_half, config.cin_activation)
        self.cin_out = LogitLinear(self.cin.output_dim, 1, bias=False)
        self.deep = FusedMLP([num_sparse * self.dim + num_dense, *config.deep_mlp, 1], dropout=config.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        linear, vectors = self.lookup(batch)
        return linear + self.cin_out(self.cin(vectors)) + self.deep(flat_input(vectors, batch.dense))
