"""Collectives behind one interface: `Communicator`.

Backends: `LocalCommunicator` (one worker), `GlooCommunicator` (torch.distributed
gloo, CPU; GPU tensors are staged through host memory) and `NcclCommunicator`
(NCCL through CuPy, GPU; nccl.py). `default_communicator` picks NCCL when every
worker has a CUDA device and cupy, gloo otherwise.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist


class Communicator(ABC):
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def all_to_all(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Rows send[sum(send_counts[:p]) : ...+send_counts[p]] go to peer p.

        Returns the rows received, ordered by sender, and how many came from each.
        """

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over workers, in place; returns `tensor`."""

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's tensor (first dims may differ), in rank order."""
        counts = [tensor.shape[0]] * self.world_size
        received, sizes = self.all_to_all(torch.cat([tensor] * self.world_size), counts)
        return list(torch.split(received, sizes))

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """How many rows each peer will send me, given how many I send each."""
        counts = torch.tensor(send_counts, dtype=torch.int64)
        received, _ = self._all_to_all_fixed(counts)
        return received.tolist()

    def _all_to_all_fixed(self, send: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError


class LocalCommunicator(Communicator):
    """World of one: every collective is the identity."""

    def all_to_all(self, send, send_counts):
        return send, list(send_counts)

    def all_reduce(self, tensor):
        return tensor

    def exchange_counts(self, send_counts):
        return list(send_counts)


class GlooCommunicator(Communicator):
    """torch.distributed with the gloo backend (the process group is already initialized, e.g. by Ray Train)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _all_to_all_fixed(self, send: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received, [1] * self.world_size

    def all_to_all(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        recv_counts = self.exchange_counts(send_counts)
        host = send.cpu().contiguous()
        received = host.new_empty((sum(recv_counts), *host.shape[1:]))
        dist.all_to_all_single(received, host, recv_counts, list(send_counts), group=self.group)
        return received.to(send.device), recv_counts

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.cpu() if tensor.is_cuda else tensor
        dist.all_reduce(host, group=self.group)
        if host is not tensor:
            tensor.copy_(host)
        return tensor


def default_communicator() -> Communicator:
    """The communicator of the current process group: NCCL if all its workers can run it, else gloo; local for one."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return LocalCommunicator()
    from .nccl import NcclCommunicator, nccl_available

    everyone = torch.tensor([int(nccl_available())])
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN)  # one backend for all, or the collectives would not meet
    return NcclCommunicator.from_process_group() if everyone.item() else GlooCommunicator()
