"""The interface of one shard's embedding store, shared by every storage option.

A store maps 64-bit keys to rows of `dim` floats with their optimizer state.
`lookup` reads rows, inserting unseen keys with rows that depend only on (seed, key);
`lookup_for_update` reads them for training and returns a `Lookup`, the handle
its `update` takes to apply the sparse optimizer to those same rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .keys import initial_rows
from .optim import SparseOptimizer, initial_state


@dataclass
class Lookup:
    """A training lookup's rows and what its update needs to find them again."""

    keys: torch.Tensor  # [N] unique keys
    rows: torch.Tensor  # [N, dim]
    where: Any = None   # the backend's own record of where the rows are (a DeviceStore's slots, a sharded route)


class EmbeddingStore(ABC):
    """One shard's rows. Keys passed to `lookup` and `update` must be unique."""

    def __init__(self, dim: int, optimizer: SparseOptimizer, seed: int = 0, init_scale: float = 0.05):
        if dim <= 0:
            raise ValueError(f"embedding dim must be positive, got {dim}")
        self.dim = dim
        self.optimizer = optimizer
        self.seed = seed
        self.init_scale = init_scale
        self.step = 0  # optimizer steps taken (Adam's bias correction uses it)

    @property
    def value_width(self) -> int:
        """Floats per key: the row and each optimizer state, `dim` wide each."""
        return self.dim * (1 + len(self.optimizer.state_names))

    def initial_values(self, keys: torch.Tensor) -> torch.Tensor:
        """[N] keys -> [N, value_width]: fresh rows with initial optimizer state."""
        return initial_state(self.optimizer, initial_rows(keys, self.dim, self.seed, self.init_scale))

    @abstractmethod
    def lookup(self, keys: torch.Tensor, insert: bool = True) -> torch.Tensor:
        """[N] unique keys -> [N, dim] rows. Unseen keys are inserted, or read as zeros with insert=False."""

    def lookup_for_update(self, keys: torch.Tensor) -> Lookup:
        """lookup(keys, insert=True), with the handle `update` takes."""
        return Lookup(keys, self.lookup(keys))

    @abstractmethod
    def update(self, lookup: Lookup, grads: torch.Tensor) -> None:
        """Apply one optimizer step to the rows of a `lookup_for_update` with grads [N, dim] (summed per key)."""

    @abstractmethod
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (keys [N], values [N, value_width]) the store holds, ordered by key, on the CPU."""

    @abstractmethod
    def load_items(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Insert or overwrite rows and optimizer state of [N] unique keys."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of keys held."""

    def prefetch(self, keys: torch.Tensor) -> None:
        """Hint: these keys come next. Tiered stores start reading their rows from the slower tiers in the
        background, for the next `lookup`; others ignore it."""

    def flush(self) -> None:
        """Write back whatever a fast tier holds dirty, so the slower tiers are a consistent point."""

    def index_bytes_per_row(self) -> dict[str, float]:
        """Bookkeeping bytes per key held, by tier: the encoder's hash table, and each cache level's slot
        map and per-slot state (`levels`, top down, for tiered stores). Rows and optimizer state not counted."""
        rows = max(len(self), 1)
        tiers = {"encoder": self.encoder.nbytes / rows}
        for level in getattr(self, "levels", []):
            tiers[level.name] = level.metadata_bytes() / rows
        return tiers

    def metrics(self) -> dict[str, float]:
        return {"rows": float(len(self))}
