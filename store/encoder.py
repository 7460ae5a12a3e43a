"""ID encoder: a growable open-addressing hash table from 64-bit keys to dense slots.

Vectorized in torch (the reference, and the CPU path): each probing round
handles every pending key at once, so a batch of N keys costs a few tensor
passes, not N Python steps. On CUDA the same table is probed by one Triton
kernel (`terarec.kernels.triton_hash`: lock-free, `atomic_cas` on the keys).
Nobody plans its capacity: it doubles when the load passes `max_load`.
"""
from __future__ import annotations

import torch

from terarec.kernels.dispatch import use_fused

from .keys import EMPTY_KEY, splitmix64


class IdEncoder:
    """Maps unique int64 keys to slots 0, 1, 2, ...; the keys new in one call take the next free slots.

    >>> enc = IdEncoder()
    >>> enc.find_or_insert(torch.tensor([42, -7])).tolist()
    [0, 1]
    >>> enc.find(torch.tensor([-7, 5])).tolist()
    [1, -1]
    """

    def __init__(self, capacity: int = 1024, max_load: float = 0.5, device: torch.device | str = "cpu"):
        capacity = 1 << max(4, (capacity - 1).bit_length())
        self.device = torch.device(device)
        self.max_load = max_load
        self.table_keys = torch.full((capacity,), EMPTY_KEY, dtype=torch.int64, device=self.device)
        self.table_slots = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.size = 0

    @property
    def capacity(self) -> int:
        return self.table_keys.numel()

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes of the table: a 64-bit key and a 64-bit slot per cell."""
        return self.table_keys.numel() * 8 + self.table_slots.numel() * 8

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """[N] unique keys -> [N] slots, -1 where a key is absent."""
        return self._probe(keys.to(self.device), insert=False)

    def find_or_insert(self, keys: torch.Tensor) -> torch.Tensor:
        """[N] unique keys -> [N] slots; absent keys get the next free slots."""
        keys = keys.to(self.device)
        if (self.size + keys.numel()) > self.max_load * self.capacity:
            # most keys of a batch are usually known: grow for the absent ones only (index memory)
            absent = int((self._probe(keys, insert=False) < 0).sum())
            if self.size + absent > self.max_load * self.capacity:
                self._grow(self.size + absent)
        return self._probe(keys, insert=True)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (keys, slots), ordered by slot."""
        used = self.table_keys != EMPTY_KEY
        keys, slots = self.table_keys[used], self.table_slots[used]
        order = torch.argsort(slots)
        return keys[order], slots[order]

    def _probe(self, keys: torch.Tensor, insert: bool, new_slots: torch.Tensor | None = None) -> torch.Tensor:
        if use_fused(self.table_keys):
            from terarec.kernels.triton_hash import probe
            slots, self.size = probe(self.table_keys, self.table_slots, keys, insert, self.size, new_slots)
            return slots
        mask = self.capacity - 1
        result = torch.full_like(keys, -1)
        pending = torch.arange(keys.numel(), device=self.device)
        positions = splitmix64(keys) & mask
        while pending.numel():
            pending_keys = keys[pending]
            found_keys = self.table_keys[positions]
            hit = found_keys == pending_keys
            result[pending[hit]] = self.table_slots[positions[hit]]
            empty = found_keys == EMPTY_KEY
            done = hit | empty
            if insert and bool(empty.any()):
                done = hit | self._claim(keys, pending, positions, empty, result, new_slots)
            elif insert:
                done = hit
            pending, positions = pending[~done], (positions[~done] + 1) & mask
        return result

    def _claim(self, keys, pending, positions, empty, result, new_slots) -> torch.Tensor:
        """Pending keys that found a free cell try to take it; one claimant wins per cell."""
        claimants, cells = pending[empty], positions[empty]
        owner = torch.full((self.capacity,), -1, dtype=torch.int64, device=self.device)
        owner.scatter_(0, cells, claimants)
        won = owner[cells] == claimants
        winners, cells = claimants[won], cells[won]
        if new_slots is None:
            slots = torch.arange(self.size, self.size + winners.numel(), device=self.device)
        else:
            slots = new_slots[winners]
        self.table_keys[cells] = keys[winners]
        self.table_slots[cells] = slots
        result[winners] = slots
        self.size += winners.numel()
        taken = torch.zeros_like(empty)
        taken[empty.nonzero().squeeze(1)[won]] = True
        return taken

    def _grow(self, needed: int) -> None:
        keys, slots = self.items()
        capacity = self.capacity
        while needed > self.max_load * capacity:
            capacity *= 2
        self.table_keys = torch.full((capacity,), EMPTY_KEY, dtype=torch.int64, device=self.device)
        self.table_slots = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.size = 0
        self._probe(keys, insert=True, new_slots=slots)

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys, slots = self.items()
        return {"keys": keys.cpu(), "slots": slots.cpu()}

    @classmethod
    def from_items(cls, keys: torch.Tensor, slots: torch.Tensor, device: torch.device | str = "cpu",
                   max_load: float = 0.5) -> "IdEncoder":
        encoder = cls(capacity=max(16, int(keys.numel() / max_load) + 1), max_load=max_load, device=device)
        encoder._probe(keys.to(encoder.device), insert=True, new_slots=slots.to(encoder.device))
        return encoder
