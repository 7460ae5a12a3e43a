"""PyTorch-like layers and the model zoo."""
from .batch import Batch
from .dcn import DCN, DCNConfig, DCNv2Config
from .deepfm import DeepFM, DeepFMConfig
from .dlrm import DLRM, DLRMConfig
from .embedding import Embedding
from .layers import CIN, CrossNet, DotInteraction, FMInteraction, FusedMLP, InnerProduct, OuterProduct
from .lr import LogisticRegression
from .mmoe import MMoE, MMoEConfig
from .optimizer import SparseDenseOptimizer
from .pnn import PNN, PNNConfig
from .registry import MODELS, build_model, model_spec
from .xdeepfm import XDeepFM, XDeepFMConfig

__all__ = ["CIN", "DCN", "DLRM", "MODELS", "PNN", "Batch", "CrossNet", "DCNConfig", "DCNv2Config", "DLRMConfig",
           "DeepFM", "DeepFMConfig", "DotInteraction", "Embedding", "FMInteraction", "FusedMLP", "InnerProduct",
           "LogisticRegression", "MMoE", "MMoEConfig", "OuterProduct", "PNNConfig", "SparseDenseOptimizer", "XDeepFM", "XDeepFMConfig",
           "build_model", "model_spec"]
