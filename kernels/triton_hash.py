"""A lock-free open-addressing hash table from 64-bit keys to slots, in Triton: the ID encoder's GPU path.

The table is two arrays, `table_keys` and `table_slots` ([capacity], int64,
capacity a power of two), laid out exactly as `terarec.store.encoder.IdEncoder`
keeps them: a key lives at `splitmix64(key) & (capacity - 1)` or the first free
cell after it (linear probing), so the torch reference and this kernel read and
write the same tables. A key claims a free cell with `atomic_cas`; its slot
comes from an atomic counter (one add per block of keys), or is given (rehash).
A key that finds its cell claimed but the slot not yet written spins on it, so
duplicate keys in one call are safe (they get one slot). Growth stays with the
caller: keep the load under 1.

Used as a "unique + inverse" (insert all B x F keys into a fresh table, the
slots are the inverse) it measured no faster than `torch.unique` on the H100
(0.40-0.46 ms vs 0.46 ms for 65536 x 26 keys, 2026-11-25), so the Embedding
front keeps `torch.unique`.

The reference is `IdEncoder`'s torch probing (`store/encoder.py`); slot
numbers within one call may differ from it, the mapping may not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hashing import EMPTY_KEY, GOLDEN, MIX1, MIX2

BLOCK = 256
_GOLDEN, _MIX1, _MIX2 = tl.constexpr(GOLDEN), tl.constexpr(MIX1), tl.constexpr(MIX2)


@triton.jit
def _splitmix64(x):
    """terarec.kernels.hashing.splitmix64 on int64 keys, in uint64 arithmetic."""
    z = x.to(tl.uint64, bitcast=True) + _GOLDEN
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    return (z ^ (z >> 31)).to(tl.int64, bitcast=True)


@triton.jit(do_not_specialize=["n"])  # varies per call: no variant per size % 16
def _probe(keys_ptr, n, table_keys_ptr, table_slots_ptr, mask, counter_ptr, given_slots_ptr, out_ptr,
           EMPTY: tl.constexpr, INSERT: tl.constexpr, GIVEN: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = slot of keys[i]; with INSERT, absent keys claim a cell and take a new (or given) slot."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    keys = tl.load(keys_ptr + offs, mask=valid, other=EMPTY)
    pos = _splitmix64(keys) & mask
    empty = tl.full([BLOCK], EMPTY, tl.int64)
    slots = tl.full([BLOCK], -1, tl.int64)
    pending = valid
    while tl.max(pending.to(tl.int32), 0) > 0:
        found = tl.load(table_keys_ptr + pos, mask=pending, other=EMPTY, volatile=INSERT)
        won = tl.zeros([BLOCK], dtype=tl.int1)
        if INSERT:
            claim = pending & (found == EMPTY)
            if tl.max(claim.to(tl.int32), 0) > 0:
                # lanes not claiming swap EMPTY for EMPTY: a no-op on any cell
                prev = tl.atomic_cas(table_keys_ptr + pos, empty, tl.where(claim, keys, empty), sem="acq_rel")
                won = claim & (prev == EMPTY)
                found = tl.where(claim, prev, found)
                wins = won.to(tl.int64)
                base = tl.atomic_add(counter_ptr, tl.sum(wins, 0))
                if GIVEN:
                    new = tl.load(given_slots_ptr + offs, mask=won, other=-1)
                else:
                    new = base + tl.cumsum(wins, 0) - 1
                tl.store(table_slots_ptr + pos, new, mask=won)
                slots = tl.where(won, new, slots)
        hit = pending & ~won & (found == keys)
        current = tl.load(table_slots_ptr + pos, mask=hit, other=-1, volatile=INSERT)
        ready = hit & (current >= 0)  # a cell claimed by another lane this call may not hold its slot yet
        slots = tl.where(ready, current, slots)
        done = won | ready
        if not INSERT:
            done = done | (pending & (found == EMPTY))
        moves = pending & ~done & ~hit
        pending = pending & ~done
        pos = tl.where(moves, (pos + 1) & mask, pos)
    tl.store(out_ptr + offs, slots, mask=valid)


def probe(table_keys: torch.Tensor, table_slots: torch.Tensor, keys: torch.Tensor, insert: bool, size: int,
          given_slots: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Launcher: [N] keys -> ([N] slots, the table's new size). Absent keys read -1 (find) or are inserted with
    slots size, size + 1, ... (or `given_slots`). The caller keeps size + N under the table's capacity."""
    keys = keys.contiguous()
    n = keys.numel()
    out = torch.empty_like(keys)
    # made on the device: torch.tensor([size], device=...) would copy from pageable memory, which waits for every
    # kernel queued so far (a find then holds up its caller until the GPU is idle)
    counter = torch.full((1,), size, dtype=torch.int64, device=keys.device)
    given = given_slots.contiguous() if given_slots is not None else out
    _probe[(triton.cdiv(n, BLOCK),)](keys, n, table_keys, table_slots, table_keys.numel() - 1, counter, given, out,
                                    EMPTY=EMPTY_KEY, INSERT=insert, GIVEN=given_slots is not None, BLOCK=BLOCK)
    return out, int(counter.item()) if insert else size

