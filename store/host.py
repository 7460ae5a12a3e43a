"""The host-memory table: every row of a `cached_host` store, in (pinned) host memory.

On a GPU machine the table is page-locked and mapped into the GPU's address
space (UVA), so the cache above can gather and scatter rows over PCIe without a
staging copy (`mode="uva"`: CuPy maps the memory, and torch's own gather and
scatter run on it as on any CUDA tensor, on the caller's stream), or in batched copies: gather on the
CPU into a pinned buffer, then one host-to-device copy (`mode="copy"`; there the
table itself stays pageable: only the staging buffer must be pinned, and torch
would round a pinned allocation up to a power of two).
bench/store.py measures both; `uva` is the default where CuPy is present.
"""
from __future__ import annotations

import numpy as np
import torch

HOST_MODES = ("uva", "copy")


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


class _PinnedRows:
    """[rows, width] float32 in page-locked, GPU-mapped host memory: a CPU tensor and a CUDA tensor of the same bytes."""

    def __init__(self, rows: int, width: int, device: torch.device):
        cupy = _cupy()
        nbytes = max(rows * width * 4, 4)
        flags = cupy.cuda.runtime.hostAllocMapped | cupy.cuda.runtime.hostAllocPortable
        self.memory = cupy.cuda.PinnedMemory(nbytes, flags)
        buffer = np.frombuffer(cupy.cuda.PinnedMemoryPointer(self.memory, 0), dtype=np.float32, count=rows * width)
        self.cpu = torch.from_numpy(buffer.reshape(rows, width))
        # with unified addressing, mapped host memory has the same address on the GPU
        mapped = cupy.cuda.UnownedMemory(self.memory.ptr, nbytes, self.memory, device.index or 0)
        self.gpu = torch.from_dlpack(cupy.ndarray((rows, width), dtype=cupy.float32,
                                                  memptr=cupy.cuda.MemoryPointer(mapped, 0)))


class HostTable:
    """Rows of `value_width` floats addressed by backing slot; grows by doubling up to `max_rows`.

    >>> table = HostTable(value_width=2); table.reserve(3)
    >>> table.write(torch.tensor([2]), torch.ones(1, 2)); table.read(torch.tensor([2])).tolist()
    [[1.0, 1.0]]
    """

    name = "host"

    def __init__(self, value_width: int, max_rows: int | None = None, device: torch.device | str = "cpu",
                 mode: str | None = None):
        self.value_width = value_width
        self.max_rows = max_rows
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        if mode is None:
            mode = "uva" if gpu and _cupy() is not None else "copy"
        if mode not in HOST_MODES:
            raise ValueError(f"host table mode {mode!r} is unknown; choose one of {', '.join(HOST_MODES)}")
        if mode == "uva" and (not gpu or _cupy() is None):
            raise ValueError("host table mode 'uva' needs a CUDA device and CuPy (pip install terarec[gpu])")
        self.mode = mode
        self.pinned = gpu  # the staging buffers of `copy`
        self.rows: _PinnedRows | None = None
        self.values = torch.empty((0, value_width))
        self.bytes_read = self.bytes_written = 0

    @property
    def slot_device(self) -> torch.device:
        """Where read and write take slots and rows without a copy."""
        return self.device if self.mode == "uva" else torch.device("cpu")

    def reserve(self, rows: int) -> None:
        capacity = self.values.shape[0]
        if rows <= capacity:
            return
        if self.max_rows is not None and rows > self.max_rows:
            raise MemoryError(f"the host table needs {rows} rows ({rows * self.value_width * 4} bytes) but "
                              f"store.host_bytes allows {self.max_rows} rows; raise store.host_bytes or use "
                              f"store.kind=cached_ssd")
        capacity = max(rows, 2 * capacity, 1024)
        if self.max_rows is not None:
            capacity = min(capacity, self.max_rows)
        if self.mode == "uva":
            torch.cuda.synchronize(self.device)  # rows written through the mapping by queued kernels land first
            grown = _PinnedRows(capacity, self.value_width, self.device)
            grown.cpu[: self.values.shape[0]] = self.values
            self.rows, self.values = grown, grown.cpu
        else:
            values = torch.empty((capacity, self.value_width))
            values[: self.values.shape[0]] = self.values
            self.values = values

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """[N] slots (any device) -> [N, W] rows on the table's device."""
        self.bytes_read += slots.numel() * self.value_width * 4
        if self.mode == "uva":
            return torch.index_select(self.rows.gpu, 0, slots.to(self.device))
        staged = torch.empty((slots.numel(), self.value_width), pin_memory=self.pinned)
        torch.index_select(self.values, 0, slots.cpu(), out=staged)
        return staged.to(self.device, non_blocking=True)

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        self.bytes_written += slots.numel() * self.value_width * 4
        if self.mode == "uva":
            self.rows.gpu.index_copy_(0, slots.to(self.device), values.to(self.device))
            return
        self.values.index_copy_(0, slots.cpu(), values.cpu())

    peek = read
    put = write  # the bottom tier: rows are always here

    def metrics(self) -> dict[str, float]:
        return {f"{self.name}_bytes_read": float(self.bytes_read), f"{self.name}_bytes_written": float(self.bytes_written),
                f"{self.name}_rows_allocated": float(self.values.shape[0])}
