"""Store option `device`: every row and its optimizer state in one tensor on the worker's device.

On CUDA the rows are read with the 16-byte-load gather kernel and updated in
place by the fused sparse-optimizer kernel (`terarec.kernels.triton_sparse_update`);
elsewhere by the torch references (gather, `optimizer.apply`, scatter).
"""
from __future__ import annotations

import torch

from terarec.kernels.gather import gather_rows

from .base import EmbeddingStore, Lookup
from .encoder import IdEncoder
from .optim import SparseOptimizer, apply_in_place


class DeviceStore(EmbeddingStore):
    """Rows in `values[slot]` ([capacity, value_width]); the encoder maps key -> slot; both grow by doubling.

    >>> from terarec.store.optim import SparseSGD
    >>> store = DeviceStore(dim=4, optimizer=SparseSGD(lr=0.1))
    >>> store.lookup(torch.tensor([7, 9])).shape
    torch.Size([2, 4])
    """

    INITIAL_ROWS = 1024  # the rows a store of no expected size starts with

    def __init__(self, dim: int, optimizer: SparseOptimizer, seed: int = 0, init_scale: float = 0.05,
                 device: torch.device | str = "cpu", initial_capacity: int = INITIAL_ROWS):
        super().__init__(dim, optimizer, seed, init_scale)
        self.device = torch.device(device)
        self.encoder = IdEncoder(capacity=2 * initial_capacity, device=self.device)
        self.values = torch.empty((initial_capacity, self.value_width), device=self.device)
        self.lookups = 0
        self.inserts = 0

    def __len__(self) -> int:
        return len(self.encoder)

    def _slots(self, keys: torch.Tensor) -> torch.Tensor:
        """Find or insert; fresh slots get their initial values. Slots never move, even when tables grow."""
        before = len(self.encoder)
        slots = self.encoder.find_or_insert(keys)
        if len(self.encoder) > before:
            self._reserve(len(self.encoder))
            fresh = slots >= before
            self.values[slots[fresh]] = self.initial_values(keys.to(self.device)[fresh])
            self.inserts += int(fresh.sum())
        return slots

    def _reserve(self, rows: int) -> None:
        if rows <= self.values.shape[0]:
            return
        capacity = self.values.shape[0]
        while capacity < rows:
            capacity *= 2
        grown = torch.empty((capacity, self.value_width), device=self.device)
        grown[: self.values.shape[0]] = self.values
        self.values = grown

    def lookup(self, keys: torch.Tensor, insert: bool = True) -> torch.Tensor:
        if insert:
            return self.lookup_for_update(keys).rows
        self.lookups += keys.numel()
        slots = self.encoder.find(keys)
        rows = gather_rows(self.values[:, : self.dim], slots.clamp(min=0))
        return rows.masked_fill((slots < 0).unsqueeze(1), 0.0)

    def lookup_for_update(self, keys: torch.Tensor) -> Lookup:
        """The rows and their slots: the update writes where the lookup read, probing no key again."""
        self.lookups += keys.numel()
        slots = self._slots(keys)  # may grow self.values: index it only afterwards
        return Lookup(keys, gather_rows(self.values[:, : self.dim], slots), where=slots)

    def update(self, lookup: Lookup, grads: torch.Tensor) -> None:
        self.step += 1
        if lookup.keys.numel() == 0:
            return
        slots = lookup.where if lookup.where is not None else self._slots(lookup.keys)  # a handle of keys alone
        apply_in_place(self.values, slots, grads.to(self.device, torch.float32), self.optimizer, self.step)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, slots = self.encoder.items()
        order = torch.argsort(keys)  # by key: the same content exports the same way
        return keys[order].cpu(), self.values[slots[order]].cpu()

    def load_items(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.numel():
            slots = self._slots(keys)
            self.values[slots] = values.to(self.device, torch.float32)

    def metrics(self) -> dict[str, float]:
        return {"rows": float(len(self)), "lookups": float(self.lookups), "inserts": float(self.inserts),
                "bytes": float(self.values.numel() * 4 + self.encoder.nbytes)}
