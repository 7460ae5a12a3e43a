"""The NCCL backend of `Communicator`, through `cupy.cuda.nccl` (imported only when one is built).

Rank 0 makes the NCCL unique ID; the others receive it over the process group
that is already up (Ray Train's gloo group), so Ray's group hands it out. Every
collective is enqueued on torch's current CUDA stream and reads and writes the
torch tensors in place through their device pointers: no copies, no CuPy arrays.
All-to-all with a different count per peer is one NCCL group of send/recv pairs.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .comm import Communicator


def nccl_available() -> bool:
    """True where this process has a CUDA device and cupy with NCCL imports."""
    if not torch.cuda.is_available():
        return False
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", True))


def _nccl_types(nccl) -> dict:
    return {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16, torch.bfloat16: nccl.NCCL_BFLOAT16,
            torch.float64: nccl.NCCL_FLOAT64, torch.int32: nccl.NCCL_INT32, torch.int64: nccl.NCCL_INT64,
            torch.uint8: nccl.NCCL_UINT8, torch.int8: nccl.NCCL_INT8}


class NcclCommunicator(Communicator):
    """One NCCL communicator over `world_size` processes, one CUDA device each."""

    def __init__(self, rank: int, world_size: int, unique_id, device: torch.device):
        import cupy
        from cupy.cuda import nccl

        self.rank, self.world_size, self.device = rank, world_size, device
        self._nccl = nccl
        with cupy.cuda.Device(device.index):
            self._comm = nccl.NcclCommunicator(world_size, unique_id, rank)

    @classmethod
    def from_process_group(cls, group: dist.ProcessGroup | None = None,
                           device: torch.device | None = None) -> NcclCommunicator:
        """Build over the ranks of an initialized torch.distributed group; rank 0's unique ID goes out through it."""
        from cupy.cuda import nccl

        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        holder = [nccl.get_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        return cls(rank, world_size, holder[0], device or torch.device("cuda", torch.cuda.current_device()))

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True).contiguous()

    def _all_to_all_fixed(self, send: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        ones = [1] * self.world_size
        return self._send_recv(self._on_device(send), ones, ones).to(send.device), ones

    def all_to_all(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        recv_counts = self.exchange_counts(send_counts)
        received = self._send_recv(self._on_device(send), list(send_counts), recv_counts)
        return received.to(send.device), recv_counts

    def _send_recv(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """One NCCL group: rows send[offset_p : offset_p + send_counts[p]] to p, recv_counts[p] rows from p."""
        received = send.new_empty((sum(recv_counts), *send.shape[1:]))
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        nccl, stream = self._nccl, self._stream()
        send_at, recv_at = send.data_ptr(), received.data_ptr()
        nccl.groupStart()
        try:
            for peer in range(self.world_size):
                if send_counts[peer]:
                    self._comm.send(send_at, send_counts[peer] * row_bytes, nccl.NCCL_UINT8, peer, stream)
                if recv_counts[peer]:
                    self._comm.recv(recv_at, recv_counts[peer] * row_bytes, nccl.NCCL_UINT8, peer, stream)
                send_at += send_counts[peer] * row_bytes
                recv_at += recv_counts[peer] * row_bytes
        finally:
            nccl.groupEnd()
        return received

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        work = self._on_device(tensor)
        if work.numel():
            self._comm.allReduce(work.data_ptr(), work.data_ptr(), work.numel(), _nccl_types(self._nccl)[work.dtype],
                                 self._nccl.NCCL_SUM, self._stream())
        if work is not tensor:
            tensor.copy_(work)
        return tensor
