"""A job's model and embedding store from its config: the one builder that training, inference and checkpoint
loading share, so they agree on the store's row width, the optimizer and the model's shape."""
from __future__ import annotations

import os

import torch
from torch import nn

from terarec.models import Embedding, model_spec
from terarec.store import EmbeddingStore, make_sparse_optimizer, make_store

from .config import TrainConfig
from .data.schema import NUM_DENSE, NUM_SPARSE


def store_width(config: TrainConfig) -> int:
    """Floats per store row for this job's model (DeepFM: embedding.dim + 1; LR: 1; else embedding.dim)."""
    return model_spec(config.model).store_width(config.embedding.dim)


def store_from_config(config: TrainConfig, device: torch.device | str = "cpu", rank: int = 0,
                      kind: str | None = None, expected_rows: int | None = None) -> EmbeddingStore:
    """One rank's store: `config.store.kind` (or `kind`; "device" to read a checkpoint), rows as the model needs;
    a device store is first sized for `expected_rows` where given (see `make_store`)."""
    store = config.store
    return make_store(kind or store.kind, store_width(config),
                      make_sparse_optimizer(config.embedding.optimizer, config.sparse_lr),
                      seed=config.seed, init_scale=config.embedding.init_scale, device=device,
                      policy=store.policy, cache_bytes=store.cache_bytes, host_bytes=store.host_bytes,
                      path=os.path.join(store.path, f"rank-{rank}") if store.path else None,
                      expected_rows=expected_rows)


def model_from_config(config: TrainConfig, backend, num_tasks: int) -> nn.Module:
    """The job's model around an Embedding front over `backend` (a store, the sharded exchange, or servers)."""
    return model_spec(config.model).build(Embedding(backend), NUM_DENSE, NUM_SPARSE, config.model_section(),
                                          num_tasks=num_tasks)


def label_columns_for(config: TrainConfig, label_columns: list[str]) -> list[str]:
    """The label columns the model learns: every one for a multi-task model, else the first (click)."""
    return label_columns if model_spec(config.model).multi_task else label_columns[:1]
