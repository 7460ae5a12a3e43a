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

Planned lookups. The training loop goes one step further (`Embedding.prepare`):
while batch N computes, `plan_lookup(next keys)` makes batch N+1's rows resident
at once, inside `planning()` (on a GPU, a stream of its own that waits only for
batch N-1's lookup, so for nothing later than batch N-2's update, while the host
may already be a step ahead of the GPU). It inserts the new keys, evicts victims
among the rows of no access still in flight (the rows of batches N-1 and N are
pinned: their updates may not have landed) and hands the background job the misses to read below and
write into their new cache slots (after the write-backs it deferred). Batch N+1's
`lookup_for_update` of those same keys then only waits for the job and gathers.
So the host finds keys, sweeps and evicts while the GPU runs batch N's backward,
and a training step's lookup reads nothing back from the GPU. Any other call
waits for the plan's job first; a residency change that could have evicted the
planned rows (the cache's `evict_bound`) makes the lookup run in full instead.

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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from terarec.kernels.gather import gather_rows

from .base import EmbeddingStore, Lookup
from .cache import CacheLevel, pieces, positions
from .encoder import IdEncoder
from .optim import SparseOptimizer, apply_in_place

PLAN_ROOM = 6  # a lookup is planned where the cache holds this many batches: three pinned, victims among the rest
ENCODER_MAX_LOAD = 0.75  # the index's share: 16 bytes a cell at 0.375-0.75 load is 21-43 bytes a row


def _staged(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the GPU to the CPU through pinned memory, without waiting for the copy."""
    if tensor.device == device:
        return tensor
    if tensor.is_cuda and device.type == "cpu":
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
    return tensor.to(device)


@dataclass
class _Plan:
    """A planned lookup: its keys' rows are resident at `cache_slots` once `job` (the fills) is done."""

    keys: torch.Tensor
    cache_slots: torch.Tensor
    access: int  # the cache access that made them resident
    job: Future | None  # fills and write-backs; its result, the event that ends them on the GPU (or None)
    done: object = None  # that event, once the job is settled


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
        self.planned_lookups = 0  # training lookups a plan made ready (plan_lookup)
        self.inserts = 0
        self.wait_s = 0.0  # time the caller waited for the background job (prefetch not done in time)
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="tiered-prefetch")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # the job's
        # (cache generation, the job: future (slots, rows, done event), the write-backs it holds until settled)
        self._job: tuple[int, Future, list] | None = None
        self._prefetched: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (generation, slots, rows) ready
        self._plan: _Plan | None = None
        self._plan_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # (cache access, on a GPU the event after it) of the latest two training lookups: a plan pins the rows of
        # both and starts after the older one's event
        self._recent: deque[tuple[int, object]] = deque(maxlen=2)
        self._caller_stream = None  # on a GPU, the stream that was current when `planning()` was entered

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
                  fresh_count: int | None = None, pinned_from: int | None = None,
                  fills: list | None = None) -> torch.Tensor:
        """Cache slots of one piece; fresh keys get their initial values, dirty. `fresh_count`, where the caller
        knows it, spares reading the count back from the device; `pinned_from` and `fills` as in
        `CacheLevel.resident`."""
        cache_slots = self.cache.resident(slots, skip_fill=fresh, record=record, prefetched=prefetched,
                                          pinned_from=pinned_from, fills=fills)
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
        """The rows, and where they sit in the top cache: while no sweep could have taken them (the cache's
        `evict_bound` is not past the lookup's access), the update writes there, probing no key in the encoder
        or the slot map again. Keys a `plan_lookup` made resident (the same tensor) are only gathered."""
        planned = self._planned(keys)
        if planned is not None:
            return planned
        rows, cache_slots = self._lookup(keys, insert=True)
        if cache_slots is None:
            return Lookup(keys, rows)
        access = self.cache.clock - 1
        self._mark_looked_up(access)
        return Lookup(keys, rows, where=(access, cache_slots))

    def _mark_looked_up(self, access: int) -> None:
        event = None
        if self._plan_stream is not None:
            event = torch.cuda.Event()
            event.record()
        self._recent.append((access, event))

    # -- planned lookups -----------------------------------------------------------------------

    @contextlib.contextmanager
    def planning(self, ready=None):
        """Where a plan's work goes: on a GPU, the planning stream, after the older of the latest two training
        lookups (and after nothing queued since: the steps in between run meanwhile on the caller's stream) and
        after `ready` (the event of the next batch's copy to the device, if any)."""
        if self._plan_stream is None:
            yield
            return
        if self._recent and self._recent[0][1] is not None:
            self._plan_stream.wait_event(self._recent[0][1])
        if ready is not None:
            self._plan_stream.wait_event(ready)
        self._caller_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._plan_stream):
            yield

    def _after_the_caller(self) -> None:
        """(Inside `planning()`.) What the planning stream queues from now on waits for all that the caller's
        stream queued: for rows copied there (write-backs deferred by a lookup or update that ran there)."""
        if self._plan_stream is not None:
            self._plan_stream.wait_stream(self._caller_stream)

    def plan_lookup(self, keys: torch.Tensor) -> bool:
        """(Inside `planning()`.) Make the next training lookup's [N] unique keys resident now, their reads
        below on the background thread; that lookup, of this same tensor, then only gathers. False (and a
        `prefetch` instead) where the cache is too small to pin three batches with room to spare."""
        self._settle()
        keys = keys.to(self.device)
        if not self._recent or PLAN_ROOM * keys.numel() > self.cache.capacity:
            self._after_the_caller()  # the job writes down what this step's lookup evicted on the caller's stream
            self.prefetch(keys)
            return False
        if self.cache.deferred or self.cache.values.shape[0] < self.cache.capacity:
            # write-backs from outside a plan (an evaluation's lookup, an update's own) were copied there; and a
            # cache still growing copies its rows to a larger tensor, which the updates queued there write into
            self._after_the_caller()
        pinned_from = self._recent[0][0]
        slots, fresh, inserted = self._slots(keys)
        fills: list = []
        cache_slots = self._resident(keys, slots, fresh, True, fresh_count=inserted, pinned_from=pinned_from,
                                     fills=fills)
        access = self.cache.clock - 1
        taken, backing = fills[0] if fills else (cache_slots[:0], slots[:0])
        deferred = self.cache.take_deferred()
        self.cache.prefetched += backing.numel()  # read ahead, as a prefetch's rows are
        planned = None
        if self._plan_stream is not None:
            planned = torch.cuda.Event()
            planned.record(self._plan_stream)
        job = self._fetcher.submit(self._fill, taken, backing, deferred, planned) if backing.numel() or deferred \
            else None
        self._plan = _Plan(keys, cache_slots, access, job, planned)
        return True

    def _fill(self, taken: torch.Tensor, backing: torch.Tensor, deferred: list, planned):
        """(On the background thread.) Write the deferred rows down, then read `backing`'s rows from below into
        cache slots `taken`. Returns the event that ends this on the GPU, or None."""
        with self._job_stream(planned):
            if self._stream is not None:  # made on the planning stream, used here: not reused before this is done
                for tensor in (taken, backing, *(t for pair in deferred for t in pair)):
                    tensor.record_stream(self._stream)
            rows = self._write_then_read(deferred, backing)
            if backing.numel():
                self.cache.values[taken] = rows
            return self._job_done()

    def _planned(self, keys: torch.Tensor) -> Lookup | None:
        """The lookup a plan of these very keys prepared, if its rows are still where it put them."""
        plan = self._plan
        if plan is None or plan.keys is not keys:
            return None
        self._plan = None
        self._settle_plan(plan)
        if self.cache.evict_bound > plan.access:  # something else swept since: its rows may be gone
            return None
        if plan.done is not None:  # the plan's work, and the fills, before the gather on this stream
            torch.cuda.current_stream(self.device).wait_event(plan.done)
            plan.cache_slots.record_stream(torch.cuda.current_stream(self.device))
        self.lookups += keys.numel()
        self.planned_lookups += 1
        rows = gather_rows(self.cache.values[:, : self.dim], plan.cache_slots)
        self._mark_looked_up(plan.access)
        return Lookup(keys, rows, where=(plan.access, plan.cache_slots))

    def _settle_plan(self, plan: _Plan) -> None:
        if plan.job is not None:
            started = time.perf_counter()
            done = plan.job.result()
            self.wait_s += time.perf_counter() - started
            plan.job = None
            plan.done = done if done is not None else plan.done
        if plan.done is not None:
            torch.cuda.current_stream(self.device).wait_event(plan.done)

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
        if lookup.where is not None and self.cache.evict_bound <= lookup.where[0]:  # the lookup's rows stayed put
            cache_slots = lookup.where[1]
            # the access the slow path's `resident` would count; not stamped: it pins nothing
            self.cache.touch(cache_slots, stamp=False)
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
        """Start reading the rows of the next batch's known keys (repeats allowed) that are not in the top cache
        (up to its capacity), on the background thread; the next `lookup` takes them. Reads nothing back from
        the GPU."""
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
            slots = self.encoder.find(torch.unique(keys))
            missing = torch.sort(self.cache.missing(slots[slots >= 0])[: self.cache.capacity]).values
            return missing, self._write_then_read(deferred, missing), self._job_done()

    def _write_then_read(self, deferred: list, slots: torch.Tensor) -> torch.Tensor:
        """(On the background thread, on the job's stream.) The deferred write-backs down, in order, then the
        rows of backing `slots` from below onto the cache's device."""
        lower = self.cache.lower
        below = lower.slot_device
        moved = [(_staged(backing, below), _staged(values, below)) for backing, values in deferred]
        wanted = _staged(slots, below)
        if self._stream is not None and below.type == "cpu":
            self._stream.synchronize()  # the copies to pinned memory have landed before the CPU reads them
        for backing, values in moved:
            lower.write(backing, values)
        if not slots.numel():
            return torch.empty((0, self.value_width), device=self.device)
        rows = lower.read(wanted)
        if rows.device != self.device:
            rows = (rows.pin_memory() if self.device.type == "cuda" else rows).to(self.device, non_blocking=True)
        return rows

    def _job_done(self):
        """(On the background thread.) The event that ends the job's work on its stream; None on the CPU."""
        if self._stream is None:
            return None
        done = torch.cuda.Event()
        done.record(self._stream)
        return done

    def _settle(self) -> None:
        """Wait for the background job; keep what it read for the next lookup. On a GPU, the work queued from
        now on runs after the job's: the rows it read, and the rows it wrote down, are free for reuse. A plan's
        fills are waited for too (the plan stays, for the lookup it prepared)."""
        if self._plan is not None:
            self._settle_plan(self._plan)
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
                "planned_lookups": float(self.planned_lookups),
                "prefetch_wait_s": self.wait_s,
                "index_bytes_per_row": sum(self.index_bytes_per_row().values()) if rows else 0.0,
                **self.cache.metrics()}
