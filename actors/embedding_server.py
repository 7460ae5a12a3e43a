"""Embedding servers for online inference: each holds a trained checkpoint's rows of the buckets it owns.

As in training, keys go to buckets and buckets to servers through a `BucketMap(num_buckets, num_servers)`;
each server loads only its buckets' rows from the checkpoint's shards. `EmbeddingShard` is the plain class
(testable without Ray); `start_servers` runs one detached Ray actor per shard; `ServerRows` is the row
backend the inference model's Embedding front reads through (lookups only: unseen IDs read zero rows and
are never inserted).
"""
from __future__ import annotations

import hashlib
import os

import torch

from terarec.core.checkpoints import CheckpointContents, open_checkpoint
from terarec.store.sharded import BucketMap

NAMESPACE = "terarec"  # the Ray namespace of serving actors
SERVER_PREFIX = "terarec-embedding"


class EmbeddingShard:
    """The rows of the buckets `rank` owns among `num_servers`, read from a checkpoint; lookups only."""

    def __init__(self, checkpoint_dir: str, rank: int, num_servers: int):
        checkpoint = open_checkpoint(checkpoint_dir)
        self.bucket_map = BucketMap(checkpoint.meta["num_buckets"], num_servers)
        self.store = checkpoint.load_rows(keep=self.bucket_map.owns(rank))
        self.dim = self.store.dim
        self.rank = rank

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """[N] keys (all owned by this shard) -> [N, D] rows; unknown keys give zero rows."""
        return self.store.lookup(keys, insert=False)

    def rows(self) -> int:
        return len(self.store)


class ServerRows:
    """Row backend over the embedding servers: splits keys by owner, asks each server, reassembles.

    Read-only: `lookup` never inserts (a serving model must not grow its tables); there is no training lookup.
    """

    def __init__(self, servers: list, num_buckets: int, dim: int):
        self.servers = servers
        self.bucket_map = BucketMap(num_buckets, len(servers))
        self.dim = dim

    def lookup(self, keys: torch.Tensor, insert: bool = False) -> torch.Tensor:
        import ray

        if insert:
            raise ValueError("serving embeddings are read-only: lookup(insert=True) is not allowed")
        owners = self.bucket_map.owner(keys)
        rows = torch.empty((keys.numel(), self.dim), dtype=torch.float32)
        asked = [(owner, owners == owner) for owner in range(len(self.servers))]
        asked = [(owner, mask) for owner, mask in asked if bool(mask.any())]
        answers = ray.get([self.servers[owner].lookup.remote(keys[mask]) for owner, mask in asked])
        for (_, mask), answer in zip(asked, answers):
            rows[mask] = answer
        return rows

    def lookup_for_update(self, keys: torch.Tensor):
        raise ValueError("serving embeddings are read-only: a serving model runs in eval mode")

    def update(self, lookup, grads: torch.Tensor) -> None:
        raise ValueError("serving embeddings are read-only")


def checkpoint_tag(checkpoint: CheckpointContents) -> str:
    """A short stable name for one checkpoint (its absolute path and step)."""
    text = f"{os.path.abspath(checkpoint.directory)}@{checkpoint.step}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def server_names(model: str, checkpoint: CheckpointContents, num_servers: int) -> list[str]:
    tag = checkpoint_tag(checkpoint)
    return [f"{SERVER_PREFIX}:{model}:{tag}:{rank}-of-{num_servers}" for rank in range(num_servers)]


def start_servers(model: str, checkpoint: CheckpointContents, num_servers: int, num_cpus: float = 0.1) -> list[str]:
    """One detached actor per shard (reused if this checkpoint is already served); waits until all are loaded."""
    import ray

    actor = ray.remote(EmbeddingShard)
    names = server_names(model, checkpoint, num_servers)
    handles = [actor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                             num_cpus=num_cpus, max_restarts=-1, max_task_retries=-1)
               .remote(os.path.abspath(checkpoint.directory), rank, num_servers)
               for rank, name in enumerate(names)]
    ray.get([handle.rows.remote() for handle in handles])
    return names


def server_handles(names: list[str]) -> list:
    import ray

    return [ray.get_actor(name, namespace=NAMESPACE) for name in names]


def stop_servers(model: str, keep: list[str] = ()) -> list[str]:
    """Kill the model's servers except `keep` (after a rollout, or when the model is deleted)."""
    import ray

    prefix = f"{SERVER_PREFIX}:{model}:"
    stopped = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] == NAMESPACE and name.startswith(prefix) and name not in keep:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                continue  # already gone
            stopped.append(name)
    return stopped
