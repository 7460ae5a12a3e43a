"""The Embedding front: raw sparse IDs in, `[B, F, D]` rows out, gradients back to the store.

The rows live outside torch's parameters (in a store, or spread over workers);
a training forward reads the unique keys' rows into a leaf tensor and keeps the
backend's `Lookup` handle; `SparseDenseOptimizer.step` (models/optimizer.py)
hands that tensor's gradient (already summed per unique key by autograd) with
the handle to the store's sparse optimizer. On CUDA the rows are spread to
`[B, F, D]` by the 16-byte-load gather kernel, whose backward is the per-key
gradient reduction. Under autocast the gather emits rows in its dtype (bf16 for
the dense part) while the rows and their gradients stay fp32.

`prepare(next sparse IDs)`, called by the training loop while a step computes,
readies the next training forward: a backend that plans lookups (a tiered store:
`TieredStore.plan_lookup`) gets that batch's unique keys, found on its planning
stream, and makes their rows resident ahead; the forward of that same tensor then
reuses the keys and the plan. Other backends get a `prefetch` hint.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from terarec.kernels.dispatch import autocast_dtype
from terarec.kernels.gather import gather_rows, unique_with_order
from terarec.store.base import Lookup
from terarec.store.keys import feature_keys


class RowBackend(Protocol):
    """Where rows come from: a local `EmbeddingStore`, or the sharded exchange across workers."""

    dim: int

    def lookup(self, keys: torch.Tensor, insert: bool = True) -> torch.Tensor: ...

    def lookup_for_update(self, keys: torch.Tensor) -> Lookup: ...

    def update(self, lookup: Lookup, grads: torch.Tensor) -> None: ...


class Embedding(nn.Module):
    """[B, F] int64 raw IDs -> [B, F, D] float rows; each feature has its own key space.

    >>> from terarec.store import DeviceStore, SparseSGD
    >>> emb = Embedding(DeviceStore(dim=8, optimizer=SparseSGD(lr=0.1)))
    >>> emb(torch.tensor([[3, 5], [3, 6]])).shape
    torch.Size([2, 2, 8])
    """

    def __init__(self, backend: RowBackend):
        super().__init__()
        self.backend = backend
        self.dim = backend.dim
        self._pending: list[tuple[Lookup, torch.Tensor]] = []  # (handle, leaf rows) of each training forward
        self._prepared: tuple | None = None  # (sparse IDs, unique keys, inverse, order) of the next forward

    @property
    def plans(self) -> bool:
        """Whether `prepare` plans lookups (else it sends a prefetch hint)."""
        return getattr(self.backend, "plan_lookup", None) is not None

    def prepare(self, sparse_ids: torch.Tensor, ready=None) -> None:
        """Ready the next training forward, of exactly this tensor (see the module's doc); `ready`, on CUDA, the
        event after which `sparse_ids` is on the device (`Batch.ready`)."""
        if not self.plans:
            self.backend.prefetch(feature_keys(sparse_ids))
            return
        with self.backend.planning(ready):
            unique_keys, inverse, order = unique_with_order(feature_keys(sparse_ids))
            planned = self.backend.plan_lookup(unique_keys)
        self._prepared = (sparse_ids, unique_keys, inverse, order) if planned else None

    def forward(self, sparse_ids: torch.Tensor) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        prepared = None
        if training:  # an evaluation in between leaves the plan for the training forward it was made for
            prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is sparse_ids:
            unique_keys, inverse, order = prepared[1:]
            if unique_keys.is_cuda:  # made on the planning stream: ready, and kept, for this one
                stream = torch.cuda.current_stream(unique_keys.device)
                for tensor in (unique_keys, inverse, *order):
                    tensor.record_stream(stream)
        else:
            unique_keys, inverse, order = unique_with_order(feature_keys(sparse_ids))
        if training:
            lookup = self.backend.lookup_for_update(unique_keys)
            rows = lookup.rows.detach().requires_grad_(True)
            self._pending.append((lookup, rows))
        else:
            rows = self.backend.lookup(unique_keys, insert=self.training)
        return gather_rows(rows, inverse, autocast_dtype(rows), order)

    def apply_gradients(self) -> None:
        """Send the gradients of every training forward since the last call to the store's optimizer, in
        forward order (sharded rows: collectives). `SparseDenseOptimizer.step` calls it."""
        for lookup, rows in self._pending:
            self.backend.update(lookup, rows.grad if rows.grad is not None else torch.zeros_like(rows))
        self._pending.clear()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={type(self.backend).__name__}"
