"""A bounded cache of value rows in front of a slower tier, evicting by LRU or LFU.

Rows are addressed by their *backing slot*: the slot the store's encoder gave
the key, which is also the row's place in the table at the bottom. A level
maps backing slot -> cache slot with a dense array (`slot_of`), so finding
the cached rows of a batch is one gather. Misses are filled from the tier below
(`lower`, another level or a table); dirty rows go back down when evicted.
A level is itself a tier: an upper level reads and writes through it.

Policy. Every access stamps each of its rows with a unique, increasing number
(the position of the row in the access, after all earlier accesses). LRU evicts
the smallest stamp; LFU the smallest (count of accesses while cached, stamp).
The rows of the access in progress are never evicted to make room for it.
"""
from __future__ import annotations

import torch

POLICIES = ("lru", "lfu")
STAMP_BITS = 44  # stamps below 2**44; LFU counts saturate at 2**19 - 1 so a score fits in int64
MAX_COUNT = (1 << 19) - 1
_NEVER = torch.iinfo(torch.int64).max
METADATA_BYTES_PER_SLOT = 8 + 8 + 4 + 1  # backing slot, stamp, count, dirty


def pieces(n: int, size: int) -> list[slice]:
    """[0, n) in consecutive slices of at most `size` (one empty slice for n = 0)."""
    return [slice(start, min(start + size, n)) for start in range(0, max(n, 1), size)]


class CacheLevel:
    """Up to `capacity` rows of `value_width` floats on `device`, in front of `lower`.

    `lower` offers read(slots) -> [N, W], write(slots, values), peek(slots),
    reserve(rows) and metrics(). Storage grows by doubling up to `capacity`.

    >>> from terarec.store.host import HostTable
    >>> table = HostTable(value_width=2)
    >>> cache = CacheLevel(table, value_width=2, capacity=2)
    >>> cache.reserve(3); cache.write(torch.tensor([0, 1, 2]), torch.ones(3, 2))
    >>> cache.metrics()["cache_evictions"]
    1.0
    """

    def __init__(self, lower, value_width: int, capacity: int, policy: str = "lru",
                 device: torch.device | str = "cpu", name: str = "cache"):
        if policy not in POLICIES:
            raise ValueError(f"store.policy {policy!r} is unknown; choose one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError(f"the {name} budget holds no row; give it at least {value_width * 4 + METADATA_BYTES_PER_SLOT} bytes")
        self.lower = lower
        self.value_width = value_width
        self.capacity = capacity
        self.policy = policy
        self.device = torch.device(device)
        self.name = name
        self.values = torch.empty((0, value_width), device=self.device)
        self.backing = torch.empty(0, dtype=torch.int64, device=self.device)  # cache slot -> backing slot, -1 free
        self.stamp = torch.empty(0, dtype=torch.int64, device=self.device)
        self.count = torch.empty(0, dtype=torch.int32, device=self.device)
        self.dirty = torch.empty(0, dtype=torch.bool, device=self.device)
        self.slot_of = torch.empty(0, dtype=torch.int32, device=self.device)  # backing slot -> cache slot, -1 absent
        self.size = 0  # cache slots in use
        self.clock = 0  # the next stamp
        self.hits = self.misses = self.evictions = self.writebacks = self.fills = 0

    # -- the tier interface, as seen from above --------------------------------------------------

    def reserve(self, rows: int) -> None:
        """Backing slots [0, rows) may be addressed from now on."""
        if rows > self.slot_of.numel():
            grown = torch.full((max(rows, 2 * self.slot_of.numel()),), -1, dtype=torch.int32, device=self.device)
            grown[: self.slot_of.numel()] = self.slot_of
            self.slot_of = grown
        self.lower.reserve(rows)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """[N] backing slots -> [N, W] rows on this level's device, cached on the way."""
        slots = slots.to(self.device)
        out = torch.empty((slots.numel(), self.value_width), device=self.device)
        for piece in pieces(slots.numel(), self.capacity):
            out[piece] = self.values[self.resident(slots[piece])]
        return out

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite whole rows; they stay here, dirty, until evicted or flushed."""
        slots, values = slots.to(self.device), values.to(self.device)
        for piece in pieces(slots.numel(), self.capacity):
            cache_slots = self.resident(slots[piece], skip_fill=True, record=False)
            self.values[cache_slots] = values[piece]
            self.dirty[cache_slots] = True

    def peek(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows as they stand now, without caching or counting anything."""
        slots = slots.to(self.device)
        values = self.lower.peek(slots).to(self.device)
        cache_slots = self.slot_of[slots].long()
        cached = cache_slots >= 0
        values[cached] = self.values[cache_slots[cached]]
        return values

    def flush(self) -> None:
        """Write every dirty row down; they stay cached, clean."""
        dirty = self.dirty.nonzero().squeeze(1)
        if dirty.numel():
            self._write_down(self.backing[dirty], self.values[dirty])
            self.dirty[dirty] = False

    # -- residency ---------------------------------------------------------------------------------

    def resident(self, slots: torch.Tensor, skip_fill: torch.Tensor | bool = False, record: bool = True,
                 protect_from: int | None = None) -> torch.Tensor:
        """Make [N <= capacity] unique backing slots resident; returns their cache slots [N].

        Misses are read from below, except where `skip_fill` is True: those rows are
        left for the caller to write (and mark dirty). Cached rows stamped at or after
        `protect_from` (default: this access) are not evicted; if that leaves too
        little room, only this access's rows are protected.
        """
        n = slots.numel()
        if n > self.capacity:
            raise ValueError(f"{n} rows do not fit the {self.name} of {self.capacity} rows; pass them in pieces")
        base = self.clock
        self.clock += n
        stamps = torch.arange(base, base + n, device=self.device)
        cache_slots = self.slot_of[slots].long()
        hit = cache_slots >= 0
        hit_slots = cache_slots[hit]
        self.stamp[hit_slots] = stamps[hit]
        if self.policy == "lfu":
            self.count[hit_slots] = (self.count[hit_slots] + 1).clamp_(max=MAX_COUNT)
        miss = (~hit).nonzero().squeeze(1)
        if record:
            self.hits += n - miss.numel()
            self.misses += miss.numel()
        if miss.numel() == 0:
            return cache_slots
        taken = self._make_room(miss.numel(), base if protect_from is None else min(protect_from, base), base)
        missed_slots = slots[miss]
        fill = torch.ones_like(miss, dtype=torch.bool) if skip_fill is False else (
            torch.zeros_like(miss, dtype=torch.bool) if skip_fill is True else ~skip_fill.to(self.device)[miss])
        fill_at = fill.nonzero().squeeze(1)
        if fill_at.numel():
            self.values[taken[fill_at]] = self.lower.read(missed_slots[fill_at]).to(self.device)
            self.fills += fill_at.numel()
        self.backing[taken] = missed_slots
        self.slot_of[missed_slots] = taken.to(torch.int32)
        self.stamp[taken] = stamps[miss]
        self.count[taken] = 1
        self.dirty[taken] = False
        self.size += miss.numel()
        cache_slots[miss] = taken
        return cache_slots

    def _make_room(self, needed: int, protect_from: int, base: int) -> torch.Tensor:
        """Free `needed` cache slots (evicting, writing dirty rows down) and return them."""
        free = self.values.shape[0] - self.size
        if free < needed and self.values.shape[0] < self.capacity:
            self._grow(min(self.capacity, max(2 * self.values.shape[0], self.size + needed, 1024)))
        score = self.stamp.clone()
        if self.policy == "lfu":
            score += self.count.long() << STAMP_BITS
        score.masked_fill_(self.backing < 0, -1)
        protected = (self.stamp >= protect_from) & (self.backing >= 0)
        if self.values.shape[0] - int(protected.sum()) < needed:
            protected = (self.stamp >= base) & (self.backing >= 0)
        score.masked_fill_(protected, _NEVER)
        taken = torch.topk(score, needed, largest=False, sorted=False).indices
        held = taken[self.backing[taken] >= 0]
        if held.numel():
            self._evict(held)
        return taken

    def _evict(self, cache_slots: torch.Tensor) -> None:
        backing = self.backing[cache_slots]
        dirty = self.dirty[cache_slots]
        if bool(dirty.any()):
            self._write_down(backing[dirty], self.values[cache_slots[dirty]])
        self.slot_of[backing] = -1
        self.backing[cache_slots] = -1
        self.evictions += cache_slots.numel()
        self.size -= cache_slots.numel()

    def _write_down(self, backing: torch.Tensor, values: torch.Tensor) -> None:
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
        self.stamp = grown(self.stamp, -1)
        self.count = grown(self.count, 0)
        self.dirty = grown(self.dirty, False)

    # -- accounting --------------------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping (slot map and per-slot state), not counting the rows themselves."""
        return self.slot_of.numel() * 4 + self.values.shape[0] * METADATA_BYTES_PER_SLOT

    def metrics(self) -> dict[str, float]:
        row_bytes = self.value_width * 4
        looked = self.hits + self.misses
        own = {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / looked if looked else 0.0,
               "evictions": self.evictions, "writebacks": self.writebacks, "rows": self.size,
               "capacity_rows": self.capacity, "bytes_in": self.fills * row_bytes,
               "bytes_out": self.writebacks * row_bytes}
        return {**{f"{self.name}_{k}": float(v) for k, v in own.items()}, **self.lower.metrics()}
