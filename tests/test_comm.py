"""Communicators: NCCL's grouped send/recv bookkeeping, backend auto-selection, NCCL against gloo on GPUs.

Without GPUs, `NcclCommunicator` runs over `FakeNccl`: a stand-in for
cupy.cuda.nccl whose ranks are threads of this process and whose buffers are host
pointers, matched at groupEnd — it checks the offsets, byte counts and pairing of
every send and recv. On GPUs the same communicator runs over real NCCL: world
size 1 on one GPU, and against gloo on two (skipped with fewer).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import types
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from terarec.kernels.comm import GlooCommunicator, default_communicator
from terarec.kernels.nccl import NcclCommunicator

gpu = pytest.mark.gpu


class FakeNccl:
    """cupy.cuda.nccl for `world` threads: send/recv pairs copy bytes between host pointers at groupEnd."""

    NCCL_UINT8, NCCL_INT8, NCCL_INT32, NCCL_INT64 = torch.uint8, torch.int8, torch.int32, torch.int64
    NCCL_FLOAT16, NCCL_BFLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    NCCL_SUM = "sum"

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=30)
        self.posted: dict[int, object] = {}
        self.local = threading.local()

    def get_unique_id(self):
        return tuple(range(128))

    def NcclCommunicator(self, world, unique_id, rank):  # noqa: N802 (cupy's name)
        self.local.rank = rank
        return FakeComm(self, rank)

    def groupStart(self):  # noqa: N802
        self.local.ops = []

    def groupEnd(self):  # noqa: N802
        rank, ops = self.local.rank, self.local.ops
        self.posted[rank] = ops
        self.barrier.wait()
        for kind, pointer, nbytes, peer in ops:
            if kind == "recv":
                sends = [(at, size) for k, at, size, to in self.posted[peer] if k == "send" and to == rank]
                assert [size for _, size in sends] == [nbytes], f"rank {rank} expects {nbytes} B from {peer}: {sends}"
                ctypes.memmove(pointer, sends[0][0], nbytes)
        self.barrier.wait()


class FakeComm:
    def __init__(self, fake: FakeNccl, rank: int):
        self.fake, self.rank = fake, rank

    def send(self, pointer, count, datatype, peer, stream):
        assert datatype is torch.uint8 and count > 0
        self.fake.local.ops.append(("send", pointer, count, peer))

    def recv(self, pointer, count, datatype, peer, stream):
        assert datatype is torch.uint8 and count > 0
        self.fake.local.ops.append(("recv", pointer, count, peer))

    def allReduce(self, send, recv, count, datatype, op, stream):  # noqa: N802
        def view(pointer):
            nbytes = count * torch.empty((), dtype=datatype).element_size()
            return torch.frombuffer((ctypes.c_byte * nbytes).from_address(pointer), dtype=datatype)

        self.fake.posted[self.rank] = send
        self.fake.barrier.wait()
        total = sum(view(pointer).clone() for pointer in self.fake.posted.values())
        self.fake.barrier.wait()
        view(recv).copy_(total)


@pytest.fixture
def fake_nccl(monkeypatch):
    """Installs FakeNccl as cupy.cuda.nccl for 3 ranks; host tensors need no CUDA stream."""
    fake = FakeNccl(3)
    cuda = types.SimpleNamespace(nccl=fake, Device=lambda index: nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setattr(NcclCommunicator, "_stream", lambda self: 0)
    return fake


def rows_from(sender: int, receiver: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """What `sender` sends `receiver`: uneven counts, some empty, values that name sender, receiver and row."""
    count = (3 * sender + 5 * receiver) % 7
    values = torch.arange(count * width).reshape(count, width) + 1000 * sender + 100 * receiver
    return values.to(dtype)


def check_rank(comm, world: int) -> None:
    rank = comm.rank
    for width, dtype in [(16, torch.float32), (1, torch.int64), (20, torch.uint8)]:
        outgoing = [rows_from(rank, peer, width, dtype) for peer in range(world)]
        received, recv_counts = comm.all_to_all(torch.cat(outgoing), [len(rows) for rows in outgoing])
        incoming = [rows_from(peer, rank, width, dtype) for peer in range(world)]
        assert recv_counts == [len(rows) for rows in incoming]
        assert torch.equal(received, torch.cat(incoming)), f"rank {rank}, {dtype}"
    keys = torch.arange(5) + 10 * rank
    gathered, _ = comm.all_to_all(keys.repeat(world), [5] * world)
    assert torch.equal(gathered, torch.cat([torch.arange(5) + 10 * peer for peer in range(world)]))
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        summed = torch.full((7,), rank + 1, dtype=dtype)
        assert comm.all_reduce(summed) is summed
        assert torch.equal(summed, torch.full((7,), world * (world + 1) // 2, dtype=dtype))
    assert [len(part) for part in comm.all_gather(torch.ones(rank + 1, 3))] == list(range(1, world + 1))


def test_nccl_grouped_send_recv_moves_every_row_to_its_peer(fake_nccl):
    world, errors = 3, []

    def rank_main(rank):
        try:
            comm = NcclCommunicator(rank, world, fake_nccl.get_unique_id(), torch.device("cpu"))
            check_rank(comm, world)
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(f"rank {rank}: {error!r}")
            fake_nccl.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors


# ---- real processes ---------------------------------------------------------------------------

def start_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def selection_worker(rank: int, world: int, port: int) -> None:
    start_gloo(rank, world, port)
    try:
        comm = default_communicator()
        assert type(comm) is GlooCommunicator, f"rank {rank} chose {type(comm).__name__}"
        check_rank(comm, world)
    finally:
        dist.destroy_process_group()


def _cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def test_default_communicator_picks_gloo_without_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the workers see no GPU, even on a GPU machine
    mp.start_processes(selection_worker, args=(3, free_port()), nprocs=3, start_method="spawn")


def nccl_vs_gloo_worker(rank: int, world: int, port: int) -> None:
    start_gloo(rank, world, port)
    try:
        nccl, gloo = default_communicator(), GlooCommunicator()
        assert isinstance(nccl, NcclCommunicator)
        generator = torch.Generator().manual_seed(rank)
        counts = torch.randint(0, 5000, (world,), generator=generator).tolist()
        rows = torch.randn(sum(counts), 132, generator=generator)
        for send in (rows, rows.to(torch.bfloat16), (rows * 50).to(torch.int8), torch.arange(sum(counts))):
            expected, expected_counts = gloo.all_to_all(send, counts)
            got, got_counts = nccl.all_to_all(send.cuda(), counts)
            assert got.is_cuda and got_counts == expected_counts
            assert torch.equal(got.cpu(), expected), f"rank {rank}: {send.dtype}"
        check_rank(nccl, world)
    finally:
        dist.destroy_process_group()


@gpu
def test_nccl_equals_gloo_on_two_gpus():
    if torch.cuda.device_count() < 2 or not _cupy():
        pytest.skip("needs two GPUs and cupy (device kind nvidia-h200-x2)")
    world = torch.cuda.device_count()
    mp.start_processes(nccl_vs_gloo_worker, args=(world, free_port()), nprocs=world, start_method="spawn")


@gpu
def test_nccl_world_of_one_on_a_gpu():
    pytest.importorskip("cupy")
    port = free_port()
    start_gloo(0, 1, port)
    try:
        comm = NcclCommunicator.from_process_group()
        rows = torch.randn(1000, 132, device="cuda")
        received, counts = comm.all_to_all(rows, [1000])
        assert counts == [1000] and received.is_cuda and torch.equal(received, rows)
        assert torch.equal(comm.all_to_all(rows[:0], [0])[0], rows[:0])
        payload = torch.randint(0, 256, (77, 36), dtype=torch.uint8, device="cuda")
        assert torch.equal(comm.all_to_all(payload, [77])[0], payload)
        host_keys = torch.arange(10)
        assert torch.equal(comm.all_to_all(host_keys, [10])[0], host_keys)
        check_rank(comm, 1)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # collectives follow torch's current stream
            big = torch.ones(1 << 20, device="cuda")
            comm.all_reduce(big)
        stream.synchronize()
        assert big.sum().item() == 1 << 20
    finally:
        dist.destroy_process_group()
