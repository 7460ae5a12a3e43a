"""Training checkpoints, in one place: writing them (every rank its shard, rank 0 the rest), finding a run's
checkpoints, and reading them back with every file checked against the checksum meta.json records.

Layout of a checkpoint directory:
  meta.json                      step, world size, buckets, model, label columns, the job config, each file's CRC-32
  dense.pt                       dense model state_dict and its optimizer (rank 0)
  shard-RRRRR-of-WWWWW.pt        one store snapshot per worker
A run keeps its checkpoints where Ray Train reports them: RUN_DIR/<run name>/checkpoint_<n>/.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from terarec.kernels.comm import Communicator
from terarec.store import EmbeddingStore, load_store, save_store
from terarec.store.snapshot import file_crc32

from .build import store_from_config
from .config import TrainConfig
from .data.schema import DENSE_TRANSFORM
from .errors import CheckpointError

DENSE_FILE, META_FILE = "dense.pt", "meta.json"
CHECKPOINTS_KEPT = 3  # a run's newest checkpoints kept under RUN_DIR/<run name>/ (Ray Train's num_to_keep)
BEST_DIR = "best"  # RUN_DIR/best: the checkpoint of the best eval AUC (keep_best)
META_KEYS = ("step", "world_size", "num_buckets", "model", "label_columns", "config", "files")


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for; the message says where it looked."""


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


# ---- writing ------------------------------------------------------------------------------------------------
def save_checkpoint(directory: str, comm: Communicator, device: torch.device, store: EmbeddingStore, step: int,
                    config: TrainConfig, label_columns: list[str], dense_state: dict) -> None:
    """Every rank writes its shard; rank 0 adds dense.pt and meta.json with each file's CRC-32.

    A collective (the shards' checksums are gathered to rank 0): every rank calls it at the same step.
    """
    store.flush()
    shard_path = os.path.join(directory, shard_file(comm.rank, comm.world_size))
    save_store(store, shard_path)
    crcs = comm.all_gather(torch.tensor([file_crc32(shard_path)], dtype=torch.int64, device=device))
    if comm.rank != 0:
        return
    dense_path = os.path.join(directory, DENSE_FILE)
    torch.save(dense_state, dense_path)
    files = {shard_file(rank, comm.world_size): int(crc) for rank, crc in enumerate(crcs)}
    files[DENSE_FILE] = file_crc32(dense_path)
    with open(os.path.join(directory, META_FILE), "w") as stream:
        json.dump({"step": step, "world_size": comm.world_size, "model": config.model,
                   "num_buckets": config.embedding.num_buckets, "label_columns": label_columns,
                   "dense_transform": DENSE_TRANSFORM, "config": config.model_dump(mode="json"), "files": files}, stream, indent=1)


# ---- finding ------------------------------------------------------------------------------------------------
def find_checkpoints(run_dir: str) -> dict[int, str]:
    """step -> checkpoint directory, for every checkpoint a run kept."""
    metas = glob.glob(os.path.join(run_dir, "*", "checkpoint_*", META_FILE))
    return {read_meta(os.path.dirname(meta))["step"]: os.path.dirname(meta) for meta in metas}


def find_checkpoint(run_dir: str, which: str) -> str:
    """'latest' -> the newest checkpoint under run_dir; 'best' -> RUN_DIR/best, kept by a run with keep_best;
    anything else is a checkpoint directory. Every file is checked against its checksum here, so a damaged
    checkpoint fails before any worker starts."""
    if which == "best":
        which = os.path.join(run_dir, BEST_DIR)
        if not os.path.isfile(os.path.join(which, META_FILE)):
            raise CheckpointNotFound(f"no best checkpoint in {run_dir}: train with keep_best=true (and eval_every > 0)")
    elif which == "latest":
        checkpoints = find_checkpoints(run_dir)
        if not checkpoints:
            raise CheckpointNotFound(f"no checkpoint under {run_dir}")
        which = checkpoints[max(checkpoints)]
    meta = read_meta(which)
    for name in meta["files"]:
        verified_path(which, meta, name)
    return which


# ---- reading ------------------------------------------------------------------------------------------------
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
        return [verified_path(self.directory, self.meta, shard_file(rank, world)) for rank in range(world)]

    def load_rows(self, store: EmbeddingStore | None = None, keep=None) -> EmbeddingStore:
        """All shards' rows (or those `keep` selects) in `store`, by default a CPU store built as training built it."""
        store = store if store is not None else store_from_config(self.config, "cpu", kind="device")
        load_store(store, self.shard_paths(), keep=keep)
        return store


def read_meta(directory: str) -> dict:
    """A checkpoint's meta.json (step, world size, buckets, model, config, checksums); one line if it is not one."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointNotFound(f"{directory} is not a terarec checkpoint: it has no {META_FILE}")
    try:
        with open(meta_path) as stream:
            meta = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint file {meta_path} is damaged: {error}") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} is not a terarec checkpoint's: it lacks {', '.join(missing)}")
    return meta


def verified_path(directory: str, meta: dict, name: str) -> str:
    """The path of the checkpoint's file `name`, after checking it against the CRC-32 in meta.json."""
    path = os.path.join(directory, name)
    if name not in meta["files"] or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete: use another one")
    if file_crc32(path) != meta["files"][name]:
        raise CheckpointError(f"checkpoint file {path} is damaged or truncated (its CRC-32 does not match "
                              f"{META_FILE}); use another checkpoint")
    return path


def open_checkpoint(directory: str) -> CheckpointContents:
    meta = read_meta(directory)
    config = TrainConfig.model_validate(meta["config"])
    dense_path = verified_path(directory, meta, DENSE_FILE)
    dense_state = torch.load(dense_path, map_location="cpu", weights_only=True)
    return CheckpointContents(directory, meta, config, dense_state)
