"""A bounded cache of value rows in front of a slower tier, evicting by CLOCK at O(1) per row.

Rows are addressed by their *backing slot*: the slot the store's encoder gave
the key, which is also the row's place in the table at the bottom. A level
maps backing slot -> cache slot with a dense array (`slot_of`), so finding
the cached rows of a batch is one gather. Misses are filled from the tier below
(`lower`, another level or a table); dirty rows go back down when evicted.
A level is itself a tier: an upper level reads and writes through it.

Policy. Each cache slot has a reference counter. An access sets it to 1 (`lru`:
CLOCK, second chance) or adds 1 up to MAX_COUNT (`lfu`: GCLOCK). To make room,
a hand sweeps the occupied slots from where it stopped: a slot with counter 0
is taken, any other loses 1 as the hand passes. No victim search over the whole
cache: each step of the hand is paid for by an earlier access, so eviction costs
O(1) per row, amortized. The rows of the access in progress are never taken.

Host round trips. On a GPU every value the host must read back (a count, a
`nonzero`) waits for all the work queued before it, and the GPU idles from then
until the host queues more: a cache access reads back only what sizes its
buffers (how many rows missed, how far the hand went, how many victims were
dirty), and everything else stays on the device (scalars are written with
`index_fill_`, which copies nothing from the host).

Write-back. With `defer_writes`, rows evicted dirty are kept in a list
(`deferred`) instead of being written down at once; whoever holds the level's
lower tiers next writes them first (`drain`), in order, before any read below.
The tiered store hands the list to its background job, so write-back leaves the
training step.

Read-around (`read_around`, the host cache of `cached_ssd`): a read from above that
misses here is served from below and *not* kept, so a miss costs one lookup in the
slot map and nothing else (no victim, no copy in). Rows enter such a level only
when the level above writes them down (its evicted dirty rows): it is a victim
cache of the level above, holding rows that level does not, instead of a second
copy of that level's own rows.
"""
from __future__ import annotations

import torch

POLICIES = ("lru", "lfu")
MAX_COUNT = 15  # GCLOCK's counter saturates here: a hot row survives at most this many passes unused
_NOT_STAMPED = -1
METADATA_BYTES_PER_SLOT = 8 + 8 + 4 + 1  # backing slot, stamp, reference counter, dirty


def positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the `count` True entries of a 1-D `mask` (the caller knows the count): no wait for the
    device, where `mask.nonzero()` would wait for every kernel queued so far to learn the output's size."""
    return torch.nonzero_static(mask, size=count).squeeze(1)


def pieces(n: int, size: int) -> list[slice]:
    """[0, n) in consecutive slices of at most `size` (one empty slice for n = 0)."""
    return [slice(start, min(start + size, n)) for start in range(0, max(n, 1), size)]


class CacheLevel:
    """Up to `capacity` rows of `value_width` floats on `device`, in front of `lower`.

    `lower` offers read(slots) -> [N, W], write(slots, values), peek(slots),
    reserve(rows) and metrics(). Storage grows by doubling up to `capacity`.
    Occupied cache slots are always [0, size): misses take the free tail first.

    >>> from terarec.store.host import HostTable
    >>> table = HostTable(value_width=2)
    >>> cache = CacheLevel(table, value_width=2, capacity=2)
    >>> cache.reserve(3); cache.write(torch.tensor([0, 1, 2]), torch.ones(3, 2))
    >>> cache.metrics()["cache_evictions"]
    1.0
    """

    def __init__(self, lower, value_width: int, capacity: int, policy: str = "lru",
                 device: torch.device | str = "cpu", name: str = "cache", read_around: bool = False,
                 pinned: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"store.policy {policy!r} is unknown; choose one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError(f"the {name} budget holds no row; give it at least {value_width * 4 + METADATA_BYTES_PER_SLOT} bytes")
        self.lower = lower
        self.value_width = value_width
        self.capacity = capacity
        self.policy = policy
        self.device = torch.device(device)
        self.slot_device = self.device  # where read and write take slots and rows without a copy
        self.name = name
        self.read_around = read_around
        self.pinned = pinned  # rows `read` returns are page-locked (a CPU level whose reads go on to a GPU)
        self.values = torch.empty((0, value_width), device=self.device)
        self.backing = torch.empty(0, dtype=torch.int64, device=self.device)  # cache slot -> backing slot, -1 free
        self.stamp = torch.empty(0, dtype=torch.int64, device=self.device)  # the access that last touched the slot
        self.ref = torch.empty(0, dtype=torch.int32, device=self.device)  # int32: counted down by atomic adds
        self.dirty = torch.empty(0, dtype=torch.bool, device=self.device)
        self.slot_of = torch.empty(0, dtype=torch.int32, device=self.device)  # backing slot -> cache slot, -1 absent
        self.size = 0  # cache slots in use: [0, size)
        self.hand = 0  # where the next sweep starts
        self.passed_per_victim = 2.0  # slots the last sweep passed per victim it found: sizes the next one's window
        self.clock = 0  # the number of the next access
        self.generation = 0  # moves whenever the set of resident rows changes, or rows below change from here
        # Rows last stamped by an access below this may have been evicted since; rows of later accesses are
        # where that access put them (every sweep takes only slots stamped below its bound).
        self.evict_bound = 0
        self.defer_writes = False
        self.deferred: list[tuple[torch.Tensor, torch.Tensor]] = []  # (backing slots, rows) not yet written down
        self.hits = self.misses = self.evictions = self.writebacks = self.fills = self.prefetched = 0

    # -- the tier interface, as seen from above --------------------------------------------------

    def reserve(self, rows: int) -> None:
        """Backing slots [0, rows) may be addressed from now on."""
        if rows > self.slot_of.numel():  # by a quarter: the map is index memory, 4 bytes a row at most 5
            grown = torch.full((max(rows, self.slot_of.numel() * 5 // 4),), -1, dtype=torch.int32, device=self.device)
            grown[: self.slot_of.numel()] = self.slot_of
            self.slot_of = grown
        self.lower.reserve(rows)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """[N] backing slots -> [N, W] rows on this level's device, cached on the way (unless `read_around`)."""
        slots = slots.to(self.device)
        if self.read_around:
            return self._read_around(slots)
        out = torch.empty((slots.numel(), self.value_width), device=self.device)
        for piece in pieces(slots.numel(), self.capacity):
            cache_slots = self.resident(slots[piece])  # may grow self.values: index it only afterwards
            out[piece] = self.values[cache_slots]
        return out

    def _read_around(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of [N] backing slots: the resident ones from here (touched), the others from below, not kept."""
        cache_slots = self.slot_of[slots].long()
        hit = cache_slots >= 0
        hits = int(hit.sum())
        self.hits += hits
        self.misses += slots.numel() - hits
        if hits == 0:
            self.drain()
            return self.lower.read(slots).to(self.device)
        out = torch.empty((slots.numel(), self.value_width), device=self.device, pin_memory=self.pinned)
        hit_slots = cache_slots[positions(hit, hits)]
        self._touch(hit_slots)
        out[hit] = self.values[hit_slots]
        if hits < slots.numel():
            self.drain()
            miss = ~hit
            out[miss] = self.lower.read(slots[miss]).to(self.device)
        return out

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite whole rows; they stay here, dirty, until evicted or flushed."""
        slots, values = slots.to(self.device), values.to(self.device)
        for piece in pieces(slots.numel(), self.capacity):
            cache_slots = self.resident(slots[piece], skip_fill=True, record=False)
            self.values[cache_slots] = values[piece]
            self.dirty.index_fill_(0, cache_slots, True)

    def put(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite whole rows where they are: here if resident (then dirty), else in the tier below (its
        `put`), without caching them here."""
        slots = slots.to(self.device)
        cache_slots = self.slot_of[slots].long()
        here = cache_slots >= 0
        if bool(here.any()):
            self.values[cache_slots[here]] = values[here.to(values.device)].to(self.device)
            self.dirty.index_fill_(0, cache_slots[here], True)
        if not bool(here.all()):
            self.drain()  # an older deferred write-back of these rows must land first
            self.generation += 1  # rows below change: what was read from there before is stale
            away = ~here
            self.lower.put(slots[away], values[away.to(values.device)])

    def peek(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows as they stand now, without caching or counting anything."""
        slots = slots.to(self.device)
        self.drain()
        values = self.lower.peek(slots).to(self.device)
        cache_slots = self.slot_of[slots].long()
        cached = cache_slots >= 0
        values[cached] = self.values[cache_slots[cached]]
        return values

    def flush(self) -> None:
        """Write every dirty row down; they stay cached, clean."""
        dirty = self.dirty[: self.size].nonzero().squeeze(1)
        if dirty.numel():
            self._write_down(self.backing[dirty], self.values[dirty], defer=False)
            self.dirty.index_fill_(0, dirty, False)

    def drain(self) -> None:
        """Write the deferred write-backs down, oldest first."""
        for backing, values in self.take_deferred():
            self.lower.write(backing, values)

    def take_deferred(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The deferred write-backs, handed to the caller who must write them down before reading below."""
        deferred, self.deferred = self.deferred, []
        return deferred

    # -- residency ---------------------------------------------------------------------------------

    def missing(self, slots: torch.Tensor) -> torch.Tensor:
        """The backing slots among [N] that are not resident here."""
        slots = slots.to(self.device)
        return slots[self.slot_of[slots] < 0]

    def resident(self, slots: torch.Tensor, skip_fill: torch.Tensor | bool = False, record: bool = True,
                 prefetched: tuple[torch.Tensor, torch.Tensor] | None = None, pinned_from: int | None = None,
                 fills: list | None = None) -> torch.Tensor:
        """Make [N <= capacity] unique backing slots resident; returns their cache slots [N].

        Misses are read from below, except where `skip_fill` is True: those rows are
        left for the caller to write (and mark dirty), and those found in `prefetched`
        (ascending backing slots [P], their rows [P, W] read from below earlier, still
        current): those are copied from there. The rows of this access are not evicted,
        nor, with `pinned_from`, those of any access numbered from it on. With `fills`
        (a list), the misses to read are not read: (cache slots, backing slots) is
        appended for the caller, who reads them below (after the write-backs this
        access deferred) and writes them in before anyone reads those cache slots.
        """
        n = slots.numel()
        if n > self.capacity:
            raise ValueError(f"{n} rows do not fit the {self.name} of {self.capacity} rows; pass them in pieces")
        cache_slots = self.slot_of[slots].long()
        hit = cache_slots >= 0
        missed = int(n - hit.sum()) if n else 0  # read back once: it sizes everything below
        if record:
            self.hits += n - missed
            self.misses += missed
        if missed == 0:
            self.touch(cache_slots)
            return cache_slots
        access = self.touch(cache_slots[positions(hit, n - missed)])
        miss = positions(~hit, missed)
        self.generation += 1
        taken = self._make_room(missed, access if pinned_from is None else min(pinned_from, access), access)
        missed_slots = slots[miss]
        fill = torch.ones_like(miss, dtype=torch.bool) if skip_fill is False else (
            torch.zeros_like(miss, dtype=torch.bool) if skip_fill is True else ~skip_fill.to(self.device)[miss])
        staged = None
        if prefetched is not None and prefetched[0].numel():
            staged_slots, staged_rows = prefetched
            place = torch.searchsorted(staged_slots, missed_slots).clamp_(max=staged_slots.numel() - 1)
            staged = fill & (staged_slots[place] == missed_slots)
            fill &= ~staged
        none = torch.zeros((), dtype=torch.int64, device=self.device)
        counts = torch.stack([fill.sum(), none if staged is None else staged.sum()]).tolist()
        if counts[1]:
            at = positions(staged, counts[1])
            self.values[taken[at]] = staged_rows[place[at]]
            self.prefetched += counts[1]
            self.fills += counts[1]
        if counts[0]:
            fill_at = positions(fill, counts[0])
            if fills is not None:
                fills.append((taken[fill_at], missed_slots[fill_at]))
            else:
                self.drain()
                self.values[taken[fill_at]] = self.lower.read(missed_slots[fill_at]).to(self.device)
            self.fills += counts[0]
        self.backing[taken] = missed_slots
        self.slot_of[missed_slots] = taken.to(torch.int32)
        self.stamp.index_fill_(0, taken, access)
        self.ref.index_fill_(0, taken, 1)  # a first access: 1 under either policy
        self.dirty.index_fill_(0, taken, False)
        self.size += missed
        cache_slots[miss] = taken
        return cache_slots

    def touch(self, cache_slots: torch.Tensor, stamp: bool = True) -> int:
        """A new access to resident rows by their cache slots (stamped, unless `stamp` is False: no sweep of this
        access takes them; counted by the policy); returns the access's number."""
        access = self.clock
        self.clock += 1
        if stamp:
            self.stamp.index_fill_(0, cache_slots, access)
        self._touch(cache_slots)
        return access

    def _touch(self, cache_slots: torch.Tensor) -> None:
        if self.policy == "lru":
            self.ref.index_fill_(0, cache_slots, 1)
        else:
            self.ref[cache_slots] = (self.ref[cache_slots] + 1).clamp_(max=MAX_COUNT)

    def _make_room(self, needed: int, bound: int, access: int) -> torch.Tensor:
        """`needed` cache slots for new rows: the free tail first, then victims of the hand (written down if dirty)
        among the slots stamped below `bound`; below `access` (pinning nothing but this access) where the pinned
        rows leave too few, once the work queued on the device has finished (their updates have landed; an
        update that finds its rows gone brings them back itself)."""
        allocated = self.values.shape[0]
        if allocated - self.size < needed and allocated < self.capacity:
            self._grow(min(self.capacity, max(2 * allocated, self.size + needed, 1024)))
        free = min(self.values.shape[0] - self.size, needed)
        taken = torch.arange(self.size, self.size + free, device=self.device)
        if free == needed:
            return taken
        victims = self._sweep(needed - free, bound)
        if victims is None and bound < access:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            victims = self._sweep(needed - free, access)
        if victims is None:
            raise RuntimeError(f"the {self.name} has no {needed - free} rows to evict outside the access in progress")
        self._evict(victims)
        return torch.cat([taken, victims])

    def _sweep(self, needed: int, bound: int) -> torch.Tensor | None:
        """Move the hand over the occupied slots until `needed` slots with counter 0, stamped below `bound` (by no
        access still in flight), are found; passed open slots lose 1 from their counter, atomically (a pinned
        slot's counter may be counted up meanwhile by another stream). None if (MAX_COUNT + 1) turns do not find
        enough.

        The hand moves in windows sized from the last sweep (slots passed per victim found, with a margin), so a
        sweep usually takes one window and reads back one pair of numbers: how many it found, and where it stopped."""
        occupied = self.size
        found, scanned, wanted = [], 0, needed
        while needed and occupied and scanned <= (MAX_COUNT + 1) * occupied:
            window = min(occupied, max(4096, int(needed * self.passed_per_victim * 1.25) + 1))
            at = torch.arange(self.hand, self.hand + window, device=self.device)
            if self.hand + window > occupied:  # past the last occupied slot the hand goes on from the first
                at.remainder_(occupied)
            ref = self.ref[at]
            open_ = self.stamp[at] < bound
            take = open_ & (ref == 0)
            count = torch.cumsum(take, 0)
            available, stop = torch.stack([count[-1], torch.searchsorted(count, needed)]).tolist()
            stop = window if available < needed else stop + 1  # just past the needed-th victim
            passed = at[:stop]
            self.ref.index_add_(0, passed, (open_ & ~take)[:stop].to(self.ref.dtype), alpha=-1)
            victims = passed[positions(take[:stop], min(available, needed))]
            self.stamp.index_fill_(0, victims, bound)  # taken: a later window of this sweep must not take it again
            found.append(victims)
            needed -= min(available, needed)
            scanned += stop
            self.hand = (self.hand + stop) % occupied
        if needed:
            return None
        self.passed_per_victim = max(1.0, scanned / wanted)
        self.evict_bound = max(self.evict_bound, bound)
        return torch.cat(found)

    def _evict(self, cache_slots: torch.Tensor) -> None:
        backing = self.backing[cache_slots]
        dirty = self.dirty[cache_slots]
        dirty_count = int(dirty.sum())
        if dirty_count:
            at = positions(dirty, dirty_count)
            self._write_down(backing[at], self.values[cache_slots[at]])
        self.slot_of.index_fill_(0, backing, -1)
        self.backing.index_fill_(0, cache_slots, -1)
        self.evictions += cache_slots.numel()
        self.size -= cache_slots.numel()

    def _write_down(self, backing: torch.Tensor, values: torch.Tensor, defer: bool = True) -> None:
        """Rows to the tier below: deferred (see the module's doc) while fewer than a quarter of the
        capacity wait, else now, after the waiting ones."""
        waiting = sum(b.numel() for b, _ in self.deferred)
        if defer and self.defer_writes and waiting + backing.numel() <= self.capacity // 4:
            self.deferred.append((backing, values.clone()))
        else:
            self.drain()
            self.lower.write(backing, values)
        self.writebacks += backing.numel()

    def _grow(self, rows: int) -> None:
        old = self.values.shape[0]

        def grown(tensor: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((rows, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=self.device)
            out[:old] = tensor
            return out

        self.values = grown(self.values, 0.0)
        self.backing = grown(self.backing, -1)
        self.stamp = grown(self.stamp, _NOT_STAMPED)
        self.ref = grown(self.ref, 0)
        self.dirty = grown(self.dirty, False)

    # -- accounting --------------------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping (slot map and per-slot state), not counting the rows themselves."""
        return self.slot_of.numel() * 4 + self.values.shape[0] * METADATA_BYTES_PER_SLOT

    def metrics(self) -> dict[str, float]:
        row_bytes = self.value_width * 4
        looked = self.hits + self.misses
        own = {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / looked if looked else 0.0,
               "evictions": self.evictions, "writebacks": self.writebacks, "fills": self.fills,
               "prefetched": self.prefetched, "rows": self.size,
               "capacity_rows": self.capacity, "bytes_in": self.fills * row_bytes,
               "bytes_out": self.writebacks * row_bytes}
        return {**{f"{self.name}_{k}": float(v) for k, v in own.items()}, **self.lower.metrics()}
