"""PyTorch-like layers and the model zoo."""
from .batch import Batch
from .dlrm import DLRM, DLRMConfig
from .embedding import Embedding
from .layers import CrossNet, DotInteraction, FusedMLP
from .lr import LogisticRegression
from .registry import MODELS, build_model, model_spec

__all__ = ["DLRM", "MODELS", "Batch", "CrossNet", "DLRMConfig", "DotInteraction", "Embedding", "FusedMLP",
           "LogisticRegression", "build_model", "model_spec"]
