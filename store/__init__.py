"""The embedding store of one shard: ID encoder, tiers, sparse optimizers, snapshots."""
from .base import EmbeddingStore
from .device import DeviceStore
from .encoder import IdEncoder
from .keys import bucket_of, feature_keys, initial_rows
from .optim import SparseAdagrad, SparseAdam, SparseSGD, make_sparse_optimizer
from .snapshot import load_store, save_store

__all__ = ["DeviceStore", "EmbeddingStore", "IdEncoder", "SparseAdagrad", "SparseAdam", "SparseSGD",
           "bucket_of", "feature_keys", "initial_rows", "load_store", "make_sparse_optimizer", "save_store"]
