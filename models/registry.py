"""The model zoo by name: each entry is a model class and its pydantic config section."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from torch import nn

from .dcn import DCN, DCNConfig, DCNv2Config
from .deepfm import DeepFM, DeepFMConfig
from .dlrm import DLRM, DLRMConfig
from .embedding import Embedding
from .lr import LogisticRegression, LRConfig
from .mmoe import MMoE, MMoEConfig
from .pnn import PNN, PNNConfig
from .xdeepfm import XDeepFM, XDeepFMConfig


@dataclass(frozen=True)
class ModelSpec:
    cls: type[nn.Module]
    config: type[BaseModel]
    embedding_dim: int | None = None  # fixed by the model (LR: 1); None means the job's embedding.dim
    sparse_lr: float = 0.05  # the default embedding.lr for this model


MODELS: dict[str, ModelSpec] = {
    "dlrm": ModelSpec(DLRM, DLRMConfig, sparse_lr=0.2),
    "lr": ModelSpec(LogisticRegression, LRConfig, embedding_dim=1, sparse_lr=0.1),
    "deepfm": ModelSpec(DeepFM, DeepFMConfig),
    "xdeepfm": ModelSpec(XDeepFM, XDeepFMConfig),
    "dcn": ModelSpec(DCN, DCNConfig),
    "dcnv2": ModelSpec(DCN, DCNv2Config),
    "pnn": ModelSpec(PNN, PNNConfig),
    "mmoe": ModelSpec(MMoE, MMoEConfig, sparse_lr=0.03),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def store_width(name: str, dim: int) -> int:
    """Row width the store must hold for model `name` at embedding.dim = dim: fixed (LR: 1),
    the model's own `embedding_width(dim)` (DeepFM: dim + 1 for the first-order weight), or dim."""
    spec = model_spec(name)
    if spec.embedding_dim is not None:
        return spec.embedding_dim
    width = getattr(spec.cls, "embedding_width", None)
    return width(dim) if width else dim


def is_multi_task(name: str) -> bool:
    return bool(getattr(model_spec(name).cls, "multi_task", False))


def build_model(name: str, embedding: Embedding, num_dense: int, num_sparse: int,
                config: BaseModel | None = None, num_tasks: int = 1) -> nn.Module:
    """A zoo model around an Embedding front. Multi-task models take `num_tasks`."""
    spec = model_spec(name)
    config = config if config is not None else spec.config()
    if is_multi_task(name):
        return spec.cls(embedding, num_dense, num_sparse, config, num_tasks=num_tasks)
    return spec.cls(embedding, num_dense, num_sparse, config)
