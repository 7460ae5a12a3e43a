"""Embedding servers for online inference: each holds a trained checkpoint's rows of the buckets it owns.

As in training, keys go to buckets and buckets to servers through a `BucketMap(num_buckets, num_servers)`;
each server loads only its buckets' rows from the checkpoint's shards into a store built as training builds
one (`store` section: device, or cached_host / cached_ssd when the table outgrows the server's memory), on
the server's GPU when it has one. `EmbeddingShard` is the plain class (testable without Ray); `start_servers`
runs one detached Ray actor per shard (`EmbeddingServer`: the shard plus its cache hit rate as a Ray metric);
`ServerRows` is the row backend the inference model's Embedding front reads through: one call per owning
server, all in flight together, behind an optional replica-local cache of recent rows (`RecentRows`).
Lookups only: unseen IDs read zero rows and are never inserted.
"""
from __future__ import annotations

import hashlib
import os
import time

import torch

from terarec.core.build import store_from_config
from terarec.core.checkpoints import CheckpointContents, open_checkpoint
from terarec.core.config import StoreConfig
from terarec.store.encoder import IdEncoder
from terarec.store.sharded import BucketMap

NAMESPACE = "terarec"  # the Ray namespace of serving actors
SERVER_PREFIX = "terarec-embedding"


def serving_store(checkpoint: CheckpointContents, store: StoreConfig, rank: int):
    """An empty store for one server's rows: the checkpoint's row width and optimizer, `store`'s tiers, on the
    GPU when this process sees one (a Ray actor sees one only when it asked for `num_gpus`)."""
    # a cached_ssd table lives under a folder of its checkpoint's own: an old table is never reopened for a new one
    path = os.path.join(store.path, checkpoint_tag(checkpoint)) if store.path else None
    config = checkpoint.config.model_copy(update={"store": store.model_copy(update={"path": path})})
    return store_from_config(config, "cuda" if torch.cuda.is_available() else "cpu", rank)


class EmbeddingShard:
    """The rows of the buckets `rank` owns among `num_servers`, read from a checkpoint; lookups only."""

    def __init__(self, checkpoint_dir: str, rank: int, num_servers: int, store: dict | None = None):
        checkpoint = open_checkpoint(checkpoint_dir)
        self.bucket_map = BucketMap(checkpoint.meta["num_buckets"], num_servers)
        empty = serving_store(checkpoint, StoreConfig.model_validate(store or {}), rank)
        self.store = checkpoint.load_rows(store=empty, keep=self.bucket_map.owns(rank))
        self.dim = self.store.dim
        self.rank = rank

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """[N] keys (all owned by this shard) -> [N, D] rows on the CPU; unknown keys give zero rows."""
        return self.store.lookup(keys, insert=False).cpu()

    def rows(self) -> int:
        return len(self.store)

    def metrics(self) -> dict[str, float]:
        """The store's counters: rows, lookups, and for a tiered store each cache level's hits and hit rate."""
        return self.store.metrics()


class EmbeddingServer(EmbeddingShard):
    """The Ray actor: a shard that exports its cache hit rate as the gauge `terarec_embedding_cache_hit_rate`."""

    EXPORT_EVERY_S = 1.0

    def __init__(self, checkpoint_dir: str, rank: int, num_servers: int, store: dict | None = None,
                 model: str = ""):
        from ray.util.metrics import Gauge

        super().__init__(checkpoint_dir, rank, num_servers, store)
        self.hit_rate = Gauge("terarec_embedding_cache_hit_rate", description="hits / lookups of an embedding "
                              "server's fastest cache level, since it started", tag_keys=("model", "server"))
        self.tags = {"model": model, "server": str(rank)}
        self.exported_at = 0.0

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        rows = super().lookup(keys)
        if time.monotonic() - self.exported_at > self.EXPORT_EVERY_S:
            self.exported_at = time.monotonic()
            self.hit_rate.set(self.metrics().get("cache_hit_rate", 1.0), tags=self.tags)  # device store: all hits
        return rows


class RecentRows:
    """A replica-local cache of rows read from the servers: at most `capacity` rows, none older than `max_age_s`.

    It empties itself whole (one generation) when it is full or its oldest row passes `max_age_s`, so a row
    a server changes is seen at most `max_age_s` later, and no per-row bookkeeping is needed.
    """

    def __init__(self, dim: int, capacity: int, max_age_s: float):
        self.dim, self.capacity, self.max_age_s = dim, capacity, max_age_s
        self.hits = self.lookups = 0
        self._clear()

    def _clear(self) -> None:
        self.encoder = IdEncoder(capacity=2 * self.capacity)
        self.values = torch.empty((self.capacity, self.dim))
        self.born = time.monotonic()

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] unique keys -> the cached ones' positions in `keys` [H] and their rows [H, D]."""
        if time.monotonic() - self.born > self.max_age_s:
            self._clear()
        slots = self.encoder.find(keys)
        held = (slots >= 0).nonzero().squeeze(1)
        self.lookups += keys.numel()
        self.hits += held.numel()
        return held, self.values[slots[held]]

    def add(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Cache `rows` of unique keys not cached yet; a full cache starts a new generation first."""
        if len(self.encoder) + keys.numel() > self.capacity:
            self._clear()
            keys, rows = keys[: self.capacity], rows[: self.capacity]
        self.values[self.encoder.find_or_insert(keys)] = rows


class ServerRows:
    """Row backend over the embedding servers: splits keys by owner, asks each server, reassembles.

    Read-only: `lookup` never inserts (a serving model must not grow its tables); there is no training lookup.
    """

    def __init__(self, servers: list, num_buckets: int, dim: int, recent: RecentRows | None = None):
        self.servers = servers
        self.bucket_map = BucketMap(num_buckets, len(servers))
        self.dim = dim
        self.recent = recent

    def lookup(self, keys: torch.Tensor, insert: bool = False) -> torch.Tensor:
        """[N] unique keys -> [N, D] rows: the recent ones from the local cache, the rest from their servers."""
        if insert:
            raise ValueError("serving embeddings are read-only: lookup(insert=True) is not allowed")
        device, keys = keys.device, keys.cpu()  # a GPU replica's keys; servers take and give CPU tensors
        if self.recent is None:
            return self._ask_servers(keys).to(device)
        rows = torch.empty((keys.numel(), self.dim), dtype=torch.float32)
        held, held_rows = self.recent.find(keys)
        rows[held] = held_rows
        missing = torch.ones(keys.numel(), dtype=torch.bool)
        missing[held] = False
        if bool(missing.any()):
            fetched = self._ask_servers(keys[missing])
            rows[missing] = fetched
            self.recent.add(keys[missing], fetched)
        return rows.to(device)

    def _ask_servers(self, keys: torch.Tensor) -> torch.Tensor:
        """One call per owning server, all in flight together."""
        import ray

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


SERVER_CPUS = 0.1  # a server mostly waits on lookups


def start_servers(model: str, checkpoint: CheckpointContents, num_servers: int, store: StoreConfig | None = None,
                  num_gpus: float = 0) -> tuple[list[str], list]:
    """One detached actor per shard (reused if this checkpoint is already served): their names, and one ObjectRef
    per server that is ready once its rows are loaded (the caller decides how long to wait)."""
    import ray

    actor = ray.remote(EmbeddingServer)
    names = server_names(model, checkpoint, num_servers)
    store_tree = store.model_dump() if store else None
    handles = [actor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                             num_cpus=SERVER_CPUS, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1)
               .remote(os.path.abspath(checkpoint.directory), rank, num_servers, store_tree, model)
               for rank, name in enumerate(names)]
    return names, [handle.rows.remote() for handle in handles]


def model_servers(model: str) -> set[str]:
    """The names of the model's live servers."""
    import ray

    prefix = f"{SERVER_PREFIX}:{model}:"
    return {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix)}


def server_handles(names: list[str]) -> list:
    import ray

    return [ray.get_actor(name, namespace=NAMESPACE) for name in names]


def stop_servers(model: str, keep: list[str] | set[str] = ()) -> list[str]:
    """Kill the model's servers except `keep` (after a rollout, or when the model is deleted)."""
    import ray

    stopped = []
    for name in model_servers(model) - set(keep):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue  # already gone
        stopped.append(name)
    return stopped
