"""Embedding servers for online inference: each holds a trained checkpoint's rows of the buckets it owns.

As in training, keys go to buckets and buckets to servers through a `BucketMap(num_buckets, num_servers)`;
each server loads only its buckets' rows from the checkpoint's shards into a store built as training builds
one (`store` section: device, or cached_host / cached_ssd when the table outgrows the server's memory), on
the server's GPU when it has one. `EmbeddingShard` is the plain class (testable without Ray); `start_servers`
runs one detached Ray actor per shard (`EmbeddingServer`: the shard plus its cache hit rate as a Ray metric);
`ServerRows` is the row backend the inference model's Embedding front reads through: one call per owning
server, all in flight together, behind an optional replica-local cache of recent rows (`RecentRows`). A replica
fetches a batch's rows on its event loop before the forward (`ServerRows.fetch`), fills its cache with every row
of a server whose rows fit in it when it starts (`warm`), and renews the cached rows from the servers in the
background before they get too old (`refresh`), so a steady stream of requests does not wait on a server.
Lookups only: unseen IDs read zero rows and are never inserted.
"""
from __future__ import annotations

import asyncio
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

    def all_rows(self, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (key, row) of the shard, if it holds at most `limit` rows (a replica's cache share); else none:
        which rows of a larger shard are hot, the replica learns from its own requests."""
        if len(self.store) > limit:
            return torch.empty(0, dtype=torch.int64), torch.empty((0, self.dim))
        keys, values = self.store.export()
        return keys, values[:, : self.dim].float()

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

    Rows come in generations: a generation is born when its rows were asked of the servers; it empties itself
    whole when it is full or older than `max_age_s` (no per-row bookkeeping), so a row a server changes is seen
    at most `max_age_s` later. Past half that age `renewal_due()`: the replica asks the servers for the held
    keys again and `renew` writes their answers over the held rows, before the generation has to be dropped.
    A generation's encoder and rows are one attribute (`_generation`), so that `renew`, which runs in a worker
    thread, writes a generation's rows at that generation's slots even if another thread starts a new one meanwhile.
    """

    def __init__(self, dim: int, capacity: int, max_age_s: float):
        self.dim, self.capacity, self.max_age_s = dim, capacity, max_age_s
        self.hits = self.lookups = 0
        self._clear()

    def _clear(self) -> None:
        self._generation = (IdEncoder(capacity=2 * self.capacity), torch.empty((self.capacity, self.dim)))
        self.born = time.monotonic()

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] unique keys -> the cached ones' positions in `keys` [H] and their rows [H, D]."""
        if time.monotonic() - self.born > self.max_age_s:
            self._clear()
        encoder, values = self._generation
        slots = encoder.find(keys)
        held = (slots >= 0).nonzero().squeeze(1)
        self.lookups += keys.numel()
        self.hits += held.numel()
        return held, values[slots[held]]

    def add(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Cache `rows` of unique keys not cached yet; a full cache starts a new generation first."""
        if len(self) + keys.numel() > self.capacity:
            self._clear()
            keys, rows = keys[: self.capacity], rows[: self.capacity]
        encoder, values = self._generation
        values[encoder.find_or_insert(keys)] = rows

    def __len__(self) -> int:
        return len(self._generation[0])

    def held_keys(self) -> torch.Tensor:
        return self._generation[0].items()[0]  # in slot order

    def renewal_due(self) -> bool:
        return len(self) > 0 and time.monotonic() - self.born > self.max_age_s / 2

    def renew(self, keys: torch.Tensor, rows: torch.Tensor, asked_at: float) -> None:
        """`rows` [N, D] the servers answered for held `keys` when asked at `asked_at` (time.monotonic), written
        over the cached ones in place; the generation's age counts from the ask (rows cached since are newer)."""
        generation = self._generation
        encoder, values = generation
        slots = encoder.find(keys)
        held = slots >= 0  # a key dropped since the ask (a new generation) stays dropped
        values[slots[held]] = rows[held]
        if self._generation is generation:
            self.born = asked_at


class ServerRows:
    """Row backend over the embedding servers: splits keys by owner, asks each server, reassembles.

    Read-only: `lookup` never inserts (a serving model must not grow its tables); there is no training lookup.
    `fetch` gets a batch's rows on the caller's event loop and holds them for the forward's `lookup` of the same
    keys; a lookup of other keys asks the servers from the calling thread.
    """

    def __init__(self, servers: list, num_buckets: int, dim: int, recent: RecentRows | None = None):
        self.servers = servers
        self.bucket_map = BucketMap(num_buckets, len(servers))
        self.dim = dim
        self.recent = recent
        self._fetched: tuple[torch.Tensor, torch.Tensor] | None = None  # the last fetch's keys and rows
        self._renewal = None  # the running renewal task (held: the event loop keeps only a weak reference)

    def lookup(self, keys: torch.Tensor, insert: bool = False) -> torch.Tensor:
        """[N] unique keys -> [N, D] rows: those of the last `fetch` if it was of these keys, else the recent
        ones from the local cache and the rest from their servers."""
        if insert:
            raise ValueError("serving embeddings are read-only: lookup(insert=True) is not allowed")
        device, keys = keys.device, keys.cpu()  # a GPU replica's keys; servers take and give CPU tensors
        fetched, self._fetched = self._fetched, None
        if fetched is not None and torch.equal(fetched[0], keys):
            return fetched[1].to(device)
        rows, missing = self._cached(keys)
        if missing is not None:
            import ray

            asked = self._ask(keys[missing])
            rows[missing] = self._kept(keys[missing], self._rows_of(asked, ray.get([ref for _, ref in asked])))
        return rows.to(device)

    async def fetch(self, keys: torch.Tensor) -> bool:
        """Get the rows of [N] unique CPU keys without blocking the event loop (the missing ones from their servers,
        all in flight together) and hold them for the next `lookup`; True if every row was cached already."""
        rows, missing = self._cached(keys)
        if missing is not None:
            asked = self._ask(keys[missing])
            rows[missing] = self._kept(keys[missing], self._rows_of(asked, await _answers(asked)))
        self._fetched = (keys, rows)
        return missing is None

    def _cached(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, D] rows with the cached ones filled in, and the mask of those still missing (None if none)."""
        rows = torch.empty((keys.numel(), self.dim), dtype=torch.float32)
        missing = torch.ones(keys.numel(), dtype=torch.bool)
        if self.recent is not None:
            held, held_rows = self.recent.find(keys)
            if held.numel() == keys.numel():
                return held_rows, None  # find returns them in key order when all are held
            rows[held] = held_rows
            missing[held] = False
        return rows, missing

    def _ask(self, keys: torch.Tensor) -> list[tuple[torch.Tensor, object]]:
        """One call per owning server, all in flight: (mask of its keys, ObjectRef of its rows)."""
        owners = self.bucket_map.owner(keys)
        asked = [(owner, owners == owner) for owner in range(len(self.servers))]
        return [(mask, self.servers[owner].lookup.remote(keys[mask])) for owner, mask in asked if bool(mask.any())]

    def _rows_of(self, asked: list, answers: list) -> torch.Tensor:
        """The servers' answers to one `_ask` as [N, D] rows in the order of its keys."""
        rows = torch.empty((len(asked[0][0]) if asked else 0, self.dim), dtype=torch.float32)  # masks span the keys
        for (mask, _), answer in zip(asked, answers):
            rows[mask] = answer
        return rows

    def _kept(self, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`rows` of `keys`, kept in the recent cache."""
        if self.recent is not None:
            self.recent.add(keys, rows)
        return rows

    def warm(self) -> int:
        """Fill the recent cache with every row of each server whose rows fit in its share of the cache (before
        the replica serves: blocking); the rows cached."""
        import ray

        if self.recent is None:
            return 0
        share = self.recent.capacity // len(self.servers)
        for keys, rows in ray.get([server.all_rows.remote(share) for server in self.servers]):
            if keys.numel():
                self.recent.add(keys, rows)
        return len(self.recent)

    def renew_when_due(self) -> None:
        """Once the cached rows are half their max age, ask the servers for them again in the background (on the
        running event loop); their answers overwrite the cached rows (a serving table changes only by a rollout,
        which starts new replicas, so a forward reading a row meanwhile reads the same values)."""
        if self.recent is not None and self._renewal is None and self.recent.renewal_due():
            self._renewal = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        try:
            asked_at = time.monotonic()
            # the held keys' and rows' bookkeeping (tens of ms for 64k rows on a busy CPU) in a worker thread, not
            # on the event loop, where it would hold every request meanwhile
            keys, asked = await asyncio.to_thread(self._ask_held)
            answers = await _answers(asked)
            await asyncio.to_thread(lambda: self.recent.renew(keys, self._rows_of(asked, answers), asked_at))
        finally:
            self._renewal = None

    def _ask_held(self) -> tuple[torch.Tensor, list]:
        keys = self.recent.held_keys()
        return keys, self._ask(keys)

    def lookup_for_update(self, keys: torch.Tensor):
        raise ValueError("serving embeddings are read-only: a serving model runs in eval mode")

    def update(self, lookup, grads: torch.Tensor) -> None:
        raise ValueError("serving embeddings are read-only")


async def _answers(asked: list) -> list:
    """The answers of one `_ask`'s calls, awaited on the event loop."""
    return list(await asyncio.gather(*(ref for _, ref in asked)))


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
