"""The model zoo by name: each entry is a model class and its pydantic config section."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from torch import nn

from .dlrm import DLRM, DLRMConfig
from .embedding import Embedding
from .lr import LogisticRegression, LRConfig


@dataclass(frozen=True)
class ModelSpec:
    cls: type[nn.Module]
    config: type[BaseModel]
    embedding_dim: int | None = None  # fixed by the model (LR: 1); None means the job's embedding.dim


MODELS: dict[str, ModelSpec] = {
    "dlrm": ModelSpec(DLRM, DLRMConfig),
    "lr": ModelSpec(LogisticRegression, LRConfig, embedding_dim=1),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, embedding: Embedding, num_dense: int, num_sparse: int,
                config: BaseModel | None = None, num_tasks: int = 1) -> nn.Module:
    """A zoo model around an Embedding front. Multi-task models take `num_tasks`."""
    spec = model_spec(name)
    config = config if config is not None else spec.config()
    if getattr(spec.cls, "multi_task", False):
        return spec.cls(embedding, num_dense, num_sparse, config, num_tasks=num_tasks)
    return spec.cls(embedding, num_dense, num_sparse, config)
