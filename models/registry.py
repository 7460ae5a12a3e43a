"""The model zoo by name: each entry is a model class and its pydantic config section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def same_width(dim: int) -> int:
    return dim


def first_order_width(dim: int) -> int:
    """[w_i | v_i] rows: one more column for the first-order weight (see `FirstOrderRows`)."""
    return dim + 1


@dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of terarec knows about one zoo model."""

    cls: type[nn.Module]
    config: type[BaseModel]
    sparse_lr: float = 0.05  # the default embedding.lr for this model (with sparse_lr_rare: where keys recur often)
    # Opt-in: the default embedding.lr where training keys recur rarely; core/steering.py's rule then picks between
    # it and sparse_lr from how often the data's keys recur (meta.json). None: sparse_lr on any data.
    sparse_lr_rare: float | None = None
    store_width: Callable[[int], int] = same_width  # store row width for the job's embedding.dim
    multi_task: bool = False  # learns every label column (one logit each); else the first (click)

    def build(self, embedding: Embedding, num_dense: int, num_sparse: int, config: BaseModel | None = None,
              num_tasks: int = 1) -> nn.Module:
        """The model around an Embedding front; `num_tasks` reaches multi-task models only."""
        config = config if config is not None else self.config()
        if self.multi_task:
            return self.cls(embedding, num_dense, num_sparse, config, num_tasks=num_tasks)
        return self.cls(embedding, num_dense, num_sparse, config)


MODELS: dict[str, ModelSpec] = {
    # DLRM's best sparse lr moves with key recurrence: 0.05 on rare-ID data, 0.2 where IDs recur (0.05 there loses
    # 0.005-0.03 AUC); DeepFM's 0.03 is within 0.001 of the best on both (bench/steer_quality.py --parts sparse_lr)
    "dlrm": ModelSpec(DLRM, DLRMConfig, sparse_lr=0.2, sparse_lr_rare=0.05),
    "lr": ModelSpec(LogisticRegression, LRConfig, sparse_lr=0.1, store_width=lambda dim: 1),
    # DeepFM's FM term sums 325 pairwise products of raw rows, so one Adagrad step (about lr per coordinate for a
    # rarely seen ID) moves its logit most: on rare-ID data 0.03 beats 0.05 by 0.011 AUC, where IDs recur it is
    # 0.0007 behind (bench/steer_quality.py --parts sparse_lr)
    "deepfm": ModelSpec(DeepFM, DeepFMConfig, sparse_lr=0.03, store_width=first_order_width),
    "xdeepfm": ModelSpec(XDeepFM, XDeepFMConfig, store_width=first_order_width),
    "dcn": ModelSpec(DCN, DCNConfig),
    "dcnv2": ModelSpec(DCN, DCNv2Config),
    "pnn": ModelSpec(PNN, PNNConfig),
    "mmoe": ModelSpec(MMoE, MMoEConfig, sparse_lr=0.03, multi_task=True),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, embedding: Embedding, num_dense: int, num_sparse: int,
                config: BaseModel | None = None, num_tasks: int = 1) -> nn.Module:
    """A zoo model by name around an Embedding front. Multi-task models take `num_tasks`."""
    return model_spec(name).build(embedding, num_dense, num_sparse, config, num_tasks)
