"""MMoE (Ma et al., 2018): shared experts, and per task a softmax gate over them and a tower.

One output column per label column of the data (e.g. click, conversion).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .batch import Batch
from .embedding import Embedding
from .layers import FusedMLP, flat_input


class MMoEConfig(BaseModel):
    """Each expert is an MLP ending in `expert_mlp[-1]` units; each tower maps that to one logit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_experts: int = Field(default=8, ge=1)
    expert_mlp: list[int] = Field(default=[64], min_length=1, description="hidden sizes of each expert")
    tower_mlp: list[int] = Field(default=[32], description="hidden sizes of each task's tower")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class MMoE(nn.Module):
    """Batch -> logits [B, T].

    x = [v_1..v_F, dense] [B, d0]; experts e_i(x) [B, E, H];
    task t: g_t = softmax(W_t x) [B, E], y_t = tower_t(sum_i g_t,i e_i(x)) [B, 1].
    """

    def __init__(self, embedding: Embedding, num_dense: int, num_sparse: int, config: MMoEConfig = MMoEConfig(),
                 num_tasks: int = 1):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"MMoE needs at least one task (label column), got num_tasks={num_tasks}")
        self.embedding = embedding
        input_dim = num_sparse * embedding.dim + num_dense
        self.experts = nn.ModuleList(FusedMLP([input_dim, *config.expert_mlp], last_activation=True,
                                              dropout=config.dropout) for _ in range(config.num_experts))
        self.gates = nn.ModuleList(nn.Linear(input_dim, config.num_experts, bias=False) for _ in range(num_tasks))
        self.towers = nn.ModuleList(FusedMLP([config.expert_mlp[-1], *config.tower_mlp, 1], dropout=config.dropout)
                                    for _ in range(num_tasks))

    def forward(self, batch: Batch) -> torch.Tensor:
        x = flat_input(self.embedding(batch.sparse), batch.dense)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, H]
        logits = []
        for gate, tower in zip(self.gates, self.towers):
            weights = torch.softmax(gate(x), dim=1).unsqueeze(2)  # [B, E, 1]
            logits.append(tower((weights * experts).sum(dim=1)))
        return torch.cat(logits, dim=1)
