"""Store options `cached_host` and `cached_ssd`: a bounded fast-tier cache in front of a larger table.

The encoder maps key -> backing slot (the row's place in the bottom table) and
never forgets a key; the cache levels (`cache.py`) hold the working set. Rows
are touched only in the top level: `lookup` makes the batch's rows resident and
reads them, `update` applies the optimizer to them there and marks them dirty.

A batch with more unique keys than the cache holds is served in cache-sized
pieces: each piece is made resident and read (or updated) before the next, so
rows of earlier pieces may be evicted again within the batch. It is correct,
only slower; a cache at least as large as a batch avoids it.

The pipeline. `prefetch(next keys)`, called while the running batch computes,
hands the next batch's keys to a background thread, which finds them, writes the
deferred write-backs (rows the cache evicted dirty) down and reads the next
batch's misses from the tiers below. The next `lookup` takes those rows instead
of reading, and makes room by the usual eviction, so the running batch's rows
stay resident until its `update` lands: only the calling thread ever changes the
top cache. The read rows are used only if the top cache's `generation` did not
move since the prefetch: no row came in or went out, and nothing was written
below past it (a load), so the rows below are still the ones read. Every call
that reads or writes below, or changes the encoder, waits for the background job
first (`_settle`).

On a GPU the background job runs on its own CUDA stream, after the work queued
when `prefetch` was called (the running batch's lookup and forward), and the
next lookup's work is queued after the job's (`_settle`: an event, no wait on the
host). So the job's copies and its gather over PCIe overlap the running batch's
backward, and the job's own read-backs (how many keys miss) hold up neither the
calling thread nor the training stream: the calling thread queues the
backward while the job waits.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from terarec.kernels.gather import gather_rows

from .base import EmbeddingStore, Lookup
from .cache import CacheLevel, pieces, positions
from .encoder import IdEncoder
from .optim import SparseOptimizer, apply_in_place

ENCODER_MAX_LOAD = 0.75  # the index's share: 16 bytes a cell at 0.375-0.75 load is 21-43 bytes a row


def _staged(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the GPU to the CPU through pinned memory, without waiting for the copy."""
    if tensor.device == device:
        return tensor
    if tensor.is_cuda and device.type == "cpu":
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
    return tensor.to(device)


class TieredStore(EmbeddingStore):
    """Rows in `cache` (a CacheLevel, possibly over further levels) in front of `table` (HostTable or SsdTable).

    >>> from terarec.store.host import HostTable
    >>> from terarec.store.optim import SparseSGD
    >>> table = HostTable(value_width=4)
    >>> store = TieredStore(4, SparseSGD(lr=0.1), CacheLevel(table, 4, capacity=2), table)
    >>> store.lookup(torch.tensor([7, 9, 11])).shape
    torch.Size([3, 4])
    """

    def __init__(self, dim: int, optimizer: SparseOptimizer, cache: CacheLevel, table, seed: int = 0,
                 init_scale: float = 0.05):
        super().__init__(dim, optimizer, seed, init_scale)
        if cache.value_width != self.value_width:
            raise ValueError(f"cache rows are {cache.value_width} floats wide; this store needs {self.value_width}")
        self.cache = cache
        self.table = table
        self.device = cache.device
        if self.device.type == "cuda" and self.device.index is None:  # the background thread needs the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        keys = getattr(table, "keys", torch.empty(0, dtype=torch.int64))
        self.encoder = IdEncoder.from_items(keys, torch.arange(keys.numel()), device=self.device,
                                            max_load=ENCODER_MAX_LOAD)
        self.cache.reserve(len(self.encoder))
        self.cache.defer_writes = True
        self.step = getattr(table, "step", 0)
        self.lookups = 0
        self.inserts = 0
        self.wait_s = 0.0  # time the caller waited for the background job (prefetch not done in time)
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="tiered-prefetch")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # the job's
        # (cache generation, the job: future (slots, rows, done event), the write-backs it holds until settled)
        self._job: tuple[int, Future, list] | None = None
        self._prefetched: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (generation, slots, rows) ready

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def levels(self) -> list[CacheLevel]:
        """The cache levels from the top down."""
        levels, level = [], self.cache
        while isinstance(level, CacheLevel):
            levels.append(level)
            level = level.lower
        return levels

    def _slots(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[N] keys -> backing slots [N], fresh [N] (inserted by this call), and how many are fresh."""
        self._settle()  # the background job reads the encoder
        before = len(self.encoder)
        slots = self.encoder.find_or_insert(keys)
        fresh = slots >= before
        inserted = len(self.encoder) - before
        if inserted:
            self.cache.reserve(len(self.encoder))
            self.inserts += inserted
        return slots, fresh, inserted

    def _resident(self, keys: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor, record: bool,
                  prefetched: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fresh_count: int | None = None) -> torch.Tensor:
        """Cache slots of one piece; fresh keys get their initial values, dirty. `fresh_count`, where the caller
        knows it, spares reading the count back from the device."""
        cache_slots = self.cache.resident(slots, skip_fill=fresh, record=record, prefetched=prefetched)
        count = int(fresh.sum()) if fresh_count is None else fresh_count
        if count:
            at = positions(fresh, count)
            fresh_slots = cache_slots[at]
            self.cache.values[fresh_slots] = self.initial_values(keys[at])
            self.cache.dirty.index_fill_(0, fresh_slots, True)
        return cache_slots

    def lookup(self, keys: torch.Tensor, insert: bool = True) -> torch.Tensor:
        return self._lookup(keys, insert)[0]

    def lookup_for_update(self, keys: torch.Tensor) -> Lookup:
        """The rows, and where they sit in the top cache: while its residency has not moved (the cache's
        `generation`), the update writes there, probing no key in the encoder or the slot map again."""
        rows, cache_slots = self._lookup(keys, insert=True)
        return Lookup(keys, rows, where=None if cache_slots is None else (self.cache.generation, cache_slots))

    def _lookup(self, keys: torch.Tensor, insert: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows [N, dim], and the keys' cache slots when they were inserted and made resident in one piece."""
        keys = keys.to(self.device)
        self.lookups += keys.numel()
        self._settle()
        prefetched = self._take_prefetched()
        inserted = None
        if insert:
            slots, fresh, inserted = self._slots(keys)
            held = torch.arange(keys.numel(), device=self.device)
        else:
            slots = self.encoder.find(keys)
            held = (slots >= 0).nonzero().squeeze(1)
            slots, fresh = slots[held], torch.zeros_like(held, dtype=torch.bool)
        parts = pieces(held.numel(), self.cache.capacity)
        if insert and len(parts) == 1:  # every key held, in one piece (a training step's): the gather is the rows
            cache_slots = self._resident(keys, slots, fresh, True, prefetched, fresh_count=inserted)
            return gather_rows(self.cache.values[:, : self.dim], cache_slots), cache_slots
        rows = torch.zeros((keys.numel(), self.dim), device=self.device)
        held_keys = keys[held]
        for piece in parts:
            cache_slots = self._resident(held_keys[piece], slots[piece], fresh[piece], True, prefetched)
            rows[held[piece]] = gather_rows(self.cache.values[:, : self.dim], cache_slots)
        return rows, None

    def update(self, lookup: Lookup, grads: torch.Tensor) -> None:
        self.step += 1
        grads = grads.to(self.device, torch.float32)
        if lookup.where is not None and lookup.where[0] == self.cache.generation:  # the lookup's rows stayed put
            cache_slots = lookup.where[1]
            self.cache.touch(cache_slots)  # the access the slow path's `resident` would count
            apply_in_place(self.cache.values, cache_slots, grads, self.optimizer, self.step)
            self.cache.dirty.index_fill_(0, cache_slots, True)
            return
        keys = lookup.keys.to(self.device)
        slots, fresh, _ = self._slots(keys)
        for piece in pieces(keys.numel(), self.cache.capacity):
            cache_slots = self._resident(keys[piece], slots[piece], fresh[piece], record=False)
            apply_in_place(self.cache.values, cache_slots, grads[piece], self.optimizer, self.step)
            self.cache.dirty.index_fill_(0, cache_slots, True)

    def prefetch(self, keys: torch.Tensor) -> None:
        """Start reading the rows of the next batch's known keys that are not in the top cache (up to its
        capacity), on the background thread; the next `lookup` takes them. Reads nothing back from the GPU."""
        self._settle()
        keys = keys.to(self.device)
        deferred = self.cache.take_deferred()
        queued = None
        if self._stream is not None:  # the job starts after what is queued now: the keys, the evicted rows
            queued = torch.cuda.Event()
            queued.record()
        job = self._fetcher.submit(self._fetch, keys, deferred, queued)
        self._job = (self.cache.generation, job, deferred)

    @contextlib.contextmanager
    def _job_stream(self, queued):
        """(On the background thread.) The job's CUDA stream, after the `queued` event; nothing on the CPU."""
        if self._stream is None:
            yield
            return
        torch.cuda.set_device(self.device)  # this thread's own current device
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(queued)
            yield

    def _fetch(self, keys: torch.Tensor, deferred: list, queued) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(On the background thread.) Find which of `keys` are known and not in the top cache, write the deferred
        rows down, then read the missing rows onto the cache's device. Returns (their backing slots ascending,
        their rows, the event that ends the job's GPU work or None)."""
        with self._job_stream(queued):
            slots = self.encoder.find(keys)
            missing = torch.sort(self.cache.missing(slots[slots >= 0])[: self.cache.capacity]).values
            lower = self.cache.lower
            below = lower.slot_device
            moved = [(_staged(backing, below), _staged(values, below)) for backing, values in deferred]
            wanted = _staged(missing, below)
            if self._stream is not None and below.type == "cpu":
                self._stream.synchronize()  # the copies to pinned memory have landed before the CPU reads them
            for backing, values in moved:
                lower.write(backing, values)
            rows = lower.read(wanted) if missing.numel() else torch.empty((0, self.value_width), device=self.device)
            if rows.device != self.device:
                rows = (rows.pin_memory() if self.device.type == "cuda" else rows).to(self.device, non_blocking=True)
            done = None
            if self._stream is not None:
                done = torch.cuda.Event()
                done.record(self._stream)
        return missing, rows, done

    def _settle(self) -> None:
        """Wait for the background job; keep what it read for the next lookup. On a GPU, the work queued from
        now on runs after the job's: the rows it read, and the rows it wrote down, are free for reuse."""
        if self._job is None:
            return
        generation, job, _ = self._job
        self._job = None
        started = time.perf_counter()
        slots, rows, done = job.result()
        self.wait_s += time.perf_counter() - started
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            slots.record_stream(stream)  # made on the job's stream, used and freed on this one
            rows.record_stream(stream)
        self._prefetched = (generation, slots, rows) if slots.numel() else None

    def _take_prefetched(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefetched (slots, rows), if the top cache's residency has not changed since they were read."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None or prefetched[0] != self.cache.generation:
            return None
        return prefetched[1], prefetched[2]

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._settle()
        keys, slots = self.encoder.items()
        order = torch.argsort(keys)  # by key, as every store exports
        return keys[order].cpu(), self.cache.peek(slots[order]).cpu()

    def load_items(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows go where their keys live: a cached row is overwritten in its cache, any other is written to
        the tier below without passing through the caches (a restore or a bulk load streams to the table)."""
        slots, _, _ = self._slots(keys.to(self.device))
        self.cache.put(slots, values)

    def flush(self) -> None:
        """Write dirty rows down every level; an SSD table then commits a snapshot (see `snapshot_id`)."""
        self._settle()
        for level in self.levels:
            level.flush()
        if hasattr(self.table, "commit"):
            self.table.commit(self.encoder.items()[0], self.step)

    def snapshot(self) -> int:
        """flush(), then the id of the snapshot it made (0 for tables that keep none)."""
        self.flush()
        return getattr(self.table, "snapshot_id", 0)

    @property
    def snapshot_id(self) -> int:
        return getattr(self.table, "snapshot_id", 0)

    def metrics(self) -> dict[str, float]:
        rows = len(self)
        return {"rows": float(rows), "lookups": float(self.lookups), "inserts": float(self.inserts),
                "prefetch_wait_s": self.wait_s,
                "index_bytes_per_row": sum(self.index_bytes_per_row().values()) if rows else 0.0,
                **self.cache.metrics()}
