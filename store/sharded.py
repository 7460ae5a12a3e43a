"""Embeddings sharded over workers: keys -> buckets -> owners, rows fetched and updated through all-to-all.

Every worker holds one `EmbeddingStore` with the rows of the buckets it owns.
`ShardedRows` is the row backend of the Embedding front on each worker; every
worker must call `lookup`, `lookup_for_update` and `update` in the same order
(they are collectives). A training lookup's `Lookup` carries its route, so its
update sends the gradients back the way the keys came.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from terarec.kernels.comm import Communicator
from terarec.kernels.gather import reduce_by_key
from terarec.kernels.quant import WireFormat, decode_rows, encode_rows

from .base import EmbeddingStore, Lookup
from .keys import bucket_of


@dataclass(frozen=True)
class BucketMap:
    """Buckets in contiguous ranges per worker: bucket b belongs to worker b * W // num_buckets.

    Resharding to another world size moves whole buckets; no key is rehashed.
    """

    num_buckets: int
    world_size: int

    def owner_of_buckets(self, buckets: torch.Tensor) -> torch.Tensor:
        return buckets * self.world_size // self.num_buckets

    def owner(self, keys: torch.Tensor) -> torch.Tensor:
        return self.owner_of_buckets(bucket_of(keys, self.num_buckets))

    def owns(self, rank: int):
        """A filter for snapshots: keep(keys) is True where `rank` owns the key."""
        return lambda keys: self.owner(keys) == rank


@dataclass
class _Route:
    """How one lookup's keys were sent, kept to send their gradients the same way."""

    order: torch.Tensor          # sorts the caller's keys by owner
    send_counts: list[int]
    recv_counts: list[int]
    owned: Lookup                # the unique keys this worker serves, as its own store looked them up
    owned_inverse: torch.Tensor  # received position -> index in owned.keys


@dataclass
class ExchangeStats:
    bytes_sent: int = 0
    seconds: float = 0.0


class ShardedRows:
    """Row backend over all workers' stores. Keys passed in must be unique on this worker."""

    def __init__(self, store: EmbeddingStore, comm: Communicator, num_buckets: int,
                 rows_format: WireFormat = "fp32", grads_format: WireFormat = "fp32"):
        self.store = store
        self.comm = comm
        self.dim = store.dim
        self.bucket_map = BucketMap(num_buckets, comm.world_size)
        self.rows_format = rows_format
        self.grads_format = grads_format
        self.stats = ExchangeStats()

    def _exchange(self, send: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        started = time.perf_counter()
        received, recv_counts = self.comm.all_to_all(send, counts)
        self.stats.seconds += time.perf_counter() - started
        self.stats.bytes_sent += send.numel() * send.element_size()
        return received, recv_counts

    def _exchange_rows(self, rows: torch.Tensor, counts: list[int], wire: WireFormat) -> torch.Tensor:
        payload = encode_rows(rows, wire)
        received, _ = self._exchange(payload, counts)
        return decode_rows(received, wire, rows.shape[1])

    def _send_keys(self, keys: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int]]:
        """Keys to their owners: (order by owner, send counts, the keys this worker received, receive counts)."""
        owners = self.bucket_map.owner(keys)
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.comm.world_size).tolist()
        received_keys, recv_counts = self._exchange(keys[order], send_counts)
        return order, send_counts, received_keys, recv_counts

    def prefetch(self, keys: torch.Tensor) -> None:
        """An early key exchange: the next batch's keys (repeats allowed) go to their owners now, whose stores start staging
        those rows (`EmbeddingStore.prefetch`) while this batch computes. A collective, like `lookup`."""
        _, _, received_keys, _ = self._send_keys(torch.unique(keys))
        self.store.prefetch(torch.unique(received_keys))

    def lookup(self, keys: torch.Tensor, insert: bool = True) -> torch.Tensor:
        return self._lookup(keys, insert, for_update=False).rows

    def lookup_for_update(self, keys: torch.Tensor) -> Lookup:
        return self._lookup(keys, insert=True, for_update=True)

    def _lookup(self, keys: torch.Tensor, insert: bool, for_update: bool) -> Lookup:
        order, send_counts, received_keys, recv_counts = self._send_keys(keys)
        owned_keys, owned_inverse = torch.unique(received_keys, return_inverse=True)
        owned = (self.store.lookup_for_update(owned_keys) if for_update
                 else Lookup(owned_keys, self.store.lookup(owned_keys, insert=insert)))
        rows_sorted = self._exchange_rows(owned.rows[owned_inverse], recv_counts, self.rows_format)
        rows = torch.empty_like(rows_sorted)
        rows[order] = rows_sorted
        route = _Route(order, send_counts, recv_counts, owned, owned_inverse) if for_update else None
        return Lookup(keys, rows, where=route)

    def update(self, lookup: Lookup, grads: torch.Tensor) -> None:
        route = lookup.where
        received = self._exchange_rows(grads[route.order], route.send_counts, self.grads_format)
        summed = reduce_by_key(received.float(), route.owned_inverse.to(received.device), route.owned.keys.numel())
        self.store.update(route.owned, summed)
