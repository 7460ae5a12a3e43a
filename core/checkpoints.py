"""Reading a training checkpoint as a whole: meta, the dense model, and every shard's rows.

Layout of a checkpoint directory (written by the training workers):
  meta.json                      step, world size, buckets, model, label columns, the job config
  dense.pt                       dense model state_dict and its optimizer (rank 0)
  shard-RRRRR-of-WWWWW.pt        one store snapshot per worker
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from terarec.store import DeviceStore, load_store, make_sparse_optimizer

from .config import TrainConfig
from .errors import UserError


DENSE_FILE, META_FILE = "dense.pt", "meta.json"
BEST_DIR = "best"  # RUN_DIR/best: the checkpoint of the best eval AUC (keep_best)


class CheckpointNotFound(UserError, FileNotFoundError):
    """No checkpoint where one was asked for; the message says where it looked."""


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


@dataclass
class CheckpointContents:
    directory: str
    meta: dict
    config: TrainConfig
    dense_state: dict

    @property
    def step(self) -> int:
        return self.meta["step"]

    def shard_paths(self) -> list[str]:
        world = self.meta["world_size"]
        return [os.path.join(self.directory, shard_file(rank, world)) for rank in range(world)]

    def load_rows(self, store: DeviceStore | None = None, keep=None) -> DeviceStore:
        """All shards' rows (or those `keep` selects) in one store."""
        if store is None:
            store = DeviceStore(self.meta.get("embedding_dim") or self.config.embedding.dim,
                                make_sparse_optimizer(self.config.embedding.optimizer, self.config.sparse_lr),
                                seed=self.config.seed, init_scale=self.config.embedding.init_scale)
        load_store(store, self.shard_paths(), keep=keep)
        return store


def read_meta(directory: str) -> dict:
    """A checkpoint's meta.json (step, world size, buckets, model, config); a clear error if it is not one."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointNotFound(f"{directory} is not a terarec checkpoint: it has no {META_FILE}")
    with open(meta_path) as stream:
        return json.load(stream)


def open_checkpoint(directory: str) -> CheckpointContents:
    meta = read_meta(directory)
    config = TrainConfig.model_validate(meta["config"])
    dense_state = torch.load(os.path.join(directory, DENSE_FILE), map_location="cpu", weights_only=True)
    return CheckpointContents(directory, meta, config, dense_state)


def find_checkpoint(run_dir: str, which: str) -> str:
    """'latest' -> the newest checkpoint under run_dir; 'best' -> RUN_DIR/best, kept by a run with keep_best;
    anything else is a checkpoint directory, checked."""
    if which == "best":
        best = os.path.join(run_dir, BEST_DIR)
        if not os.path.isfile(os.path.join(best, META_FILE)):
            raise CheckpointNotFound(f"no best checkpoint in {run_dir}: train with keep_best=true (and eval_every > 0)")
        return best
    if which != "latest":
        read_meta(which)
        return which
    candidates = [os.path.dirname(path) for path in glob.glob(os.path.join(run_dir, "*", "checkpoint_*", META_FILE))]
    if not candidates:
        raise CheckpointNotFound(f"no checkpoint under {run_dir}")
    return max(candidates, key=lambda directory: read_meta(directory)["step"])
