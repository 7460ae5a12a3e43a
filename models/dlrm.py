"""DLRM (Naumov et al., 2019): bottom MLP over dense features, dot interaction with the embeddings, top MLP."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from terarec.kernels import interaction_output_dim

from .batch import Batch
from .embedding import Embedding
from .layers import DotInteraction, FusedMLP

# The top MLP's input width is padded with zero columns to a multiple of 8 (479 -> 480 at 26 features x 128):
# bf16 GEMMs want 16-byte aligned rows; NVIDIA's DLRM pads the same way. The zero columns' weights start at 0
# and get no gradient.
INTERACTION_PAD_TO = 8


class DLRMConfig(BaseModel):
    """`bottom_mlp` and `top_mlp` are hidden sizes; the bottom ends at the embedding dim, the top at 1 logit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bottom_mlp: list[int] = Field(default=[64], description="hidden sizes of the bottom MLP")
    top_mlp: list[int] = Field(default=[256, 128], description="hidden sizes of the top MLP")
    self_interaction: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class DLRM(nn.Module):
    """Batch -> logits [B, 1].

    dense [B, 13] -> bottom MLP -> [B, D]; sparse [B, 26] -> Embedding -> [B, 26, D];
    dot interaction -> [B, D + 27*26/2, zero-padded to a multiple of 8] -> top MLP -> [B, 1].
    """

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: DLRMConfig = DLRMConfig()):
        super().__init__()
        dim = embedding.dim
        self.embedding = embedding
        self.bottom_mlp = FusedMLP([num_dense, *config.bottom_mlp, dim], last_activation=True)
        self.interaction = DotInteraction(config.self_interaction, INTERACTION_PAD_TO)
        # drawn at the unpadded width, then zero weights for the pad columns: the same model as without padding
        self.top_mlp = FusedMLP([interaction_output_dim(dim, num_sparse, config.self_interaction), *config.top_mlp, 1],
                                dropout=config.dropout)
        self.top_mlp.pad_input(self.interaction.output_dim(dim, num_sparse))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(batch.dense, self.embedding(batch.sparse))

    def head(self, dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Everything after the lookup, dense [B, 13] and rows [B, 26, D] -> logits: fixed shapes for a fixed
        batch, so a training step can replay it as CUDA graphs (`models.graphed.GraphedHead`)."""
        return self.top_mlp(self.interaction(self.bottom_mlp(dense), rows))
