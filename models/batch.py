"""The one batch type every terarec layer speaks: dense features, raw sparse IDs, labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """A batch of B samples in the Criteo layout.

    dense:  [B, num_dense] float32, already log-transformed
    sparse: [B, num_sparse] int64 raw feature IDs (any 64-bit value)
    labels: [B, num_tasks] float32 in {0, 1}
    ready:  on CUDA, the event after which the parts are on the device (the reader copies on a side
            stream), for work on streams other than the step's; None when they are ready now

    >>> b = Batch(torch.zeros(2, 13), torch.zeros(2, 26, dtype=torch.long), torch.ones(2, 1))
    >>> len(b)
    2
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    ready: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = {self.dense.shape[0], self.sparse.shape[0], self.labels.shape[0]}
        if len(sizes) != 1:
            raise ValueError(f"Batch parts disagree on the batch size: dense {tuple(self.dense.shape)}, "
                             f"sparse {tuple(self.sparse.shape)}, labels {tuple(self.labels.shape)}")
        if self.sparse.dtype != torch.int64:
            raise ValueError(f"Batch.sparse must be int64 raw IDs, got {self.sparse.dtype}")

    def __len__(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.dense.to(device, non_blocking=non_blocking),
                     self.sparse.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), self.labels.pin_memory())

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(self.dense[start:stop], self.sparse[start:stop], self.labels[start:stop])

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        return Batch(torch.cat([b.dense for b in batches]), torch.cat([b.sparse for b in batches]),
                     torch.cat([b.labels for b in batches]))
