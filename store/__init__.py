"""The embedding store of one shard: ID encoder, tiers, sparse optimizers, snapshots."""
from .base import EmbeddingStore
from .cache import CacheLevel
from .device import DeviceStore
from .encoder import IdEncoder
from .factory import STORE_KINDS, make_store
from .host import HostTable
from .keys import bucket_of, feature_keys, initial_rows
from .optim import SparseAdagrad, SparseAdam, SparseSGD, make_sparse_optimizer
from .snapshot import load_store, save_store
from .ssd import DamagedTableError, SsdTable
from .tiered import TieredStore

__all__ = ["STORE_KINDS", "CacheLevel", "DamagedTableError", "DeviceStore", "EmbeddingStore", "HostTable",
           "IdEncoder", "SparseAdagrad", "SparseAdam", "SparseSGD", "SsdTable", "TieredStore", "bucket_of",
           "feature_keys", "initial_rows", "load_store", "make_sparse_optimizer", "make_store", "save_store"]
