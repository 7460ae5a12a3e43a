"""The GPU embedding path against the torch references: the Triton hash table (the encoder's), the fused
sparse-optimizer update, and the store and Embedding front running on them.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py for the session; its atomics run lane by
lane, so `atomic_cas` claims are exact there) and `fused_kernels(True)` switches
the dispatch on for CPU tensors; with CUDA they run compiled. Slot numbers may
differ from the reference's: the tests check the mapping (same key, same slot,
across calls; distinct keys, distinct slots; slots dense; absent keys -1).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from terarec.kernels.dispatch import fused_kernels  # noqa: E402
from terarec.kernels.triton_hash import EMPTY_KEY, probe  # noqa: E402
from terarec.kernels.triton_sparse_update import sparse_update_  # noqa: E402
from terarec.models import Embedding, SparseDenseOptimizer  # noqa: E402
from terarec.store import DeviceStore, IdEncoder, SparseAdagrad, SparseAdam, SparseSGD  # noqa: E402
from terarec.store import keys as store_keys  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OPTIMIZERS = [SparseSGD(lr=0.1), SparseAdagrad(lr=0.1), SparseAdam(lr=0.01)]
gpu = pytest.mark.gpu


@pytest.fixture
def kernels_on():
    """Dispatch to the Triton kernels for CPU tensors too (interpreter); CUDA tensors use them anyway."""
    with fused_kernels(True):
        yield


def random_keys(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n] distinct int64 keys, fresh each draw, never EMPTY_KEY."""
    keys = torch.unique(torch.randint(-2**63 + 1, 2**63 - 1, (n,), generator=gen, dtype=torch.int64))
    return keys[torch.randperm(keys.numel(), generator=gen)].to(DEVICE)


def mapping(keys: torch.Tensor, slots: torch.Tensor) -> dict[int, int]:
    return dict(zip(keys.tolist(), slots.tolist()))


def test_empty_key_is_the_stores():
    assert EMPTY_KEY == store_keys.EMPTY_KEY


def test_kernel_reads_and_extends_a_reference_table():
    """The kernel hashes like the reference: it finds what the torch probing inserted, and vice versa."""
    gen = torch.Generator().manual_seed(1)
    keys = random_keys(3000, gen)
    reference = IdEncoder(capacity=16, device=DEVICE)
    old = reference.find_or_insert(keys[:1000])
    found, size = probe(reference.table_keys, reference.table_slots, keys[:1500], False, reference.size)
    assert torch.equal(found[:1000], old) and (found[1000:] == -1).all() and size == 1000
    slots, size = probe(reference.table_keys, reference.table_slots, keys[500:1500], True, reference.size)
    reference.size = size
    assert torch.equal(slots[:500], old[500:]) and size == 1500
    assert sorted(slots[500:].tolist()) == list(range(1000, 1500))
    assert torch.equal(reference._probe(keys[:1500], insert=False), torch.cat([old, slots[500:]]))


def test_encoder_mapping(kernels_on):
    """find_or_insert / find / growth / items / from_items on the kernel keep the reference's mapping semantics."""
    gen = torch.Generator().manual_seed(2)
    encoder = IdEncoder(capacity=16, device=DEVICE)
    seen: dict[int, int] = {}
    pool = random_keys(4000, gen)
    for _ in range(4):  # batches mixing seen and unseen keys; the table grows several times
        batch = torch.unique(pool[torch.randint(0, pool.numel(), (900,), generator=gen).to(DEVICE)])
        batch = batch[torch.randperm(batch.numel(), generator=gen).to(DEVICE)]
        slots = encoder.find_or_insert(batch)
        for key, slot in mapping(batch, slots).items():
            assert seen.setdefault(key, slot) == slot, "a key changed slot"
        assert len(set(seen.values())) == len(seen), "two keys share a slot"
        assert sorted(seen.values()) == list(range(len(seen))) and len(encoder) == len(seen)
    assert 2048 < encoder.capacity and len(encoder) <= encoder.max_load * encoder.capacity
    absent = random_keys(300, gen)
    absent = absent[~torch.isin(absent, pool)]
    probe_keys = torch.cat([pool[:200], absent])
    found = encoder.find(probe_keys)
    assert found.tolist() == [seen.get(k, -1) for k in probe_keys.tolist()]
    keys, slots = encoder.items()
    assert mapping(keys, slots) == seen and torch.equal(slots.cpu(), torch.arange(len(seen)))
    copy = IdEncoder.from_items(keys, slots, device=DEVICE)
    assert torch.equal(copy.find(keys), slots) and len(copy) == len(seen)


def check_duplicates_share_slots(keys: torch.Tensor) -> None:
    """Insert keys with repeats into a fresh table: each distinct key gets one slot, the slots are 0..U-1."""
    capacity = 1 << (2 * keys.numel()).bit_length()
    table_keys = torch.full((capacity,), EMPTY_KEY, dtype=torch.int64, device=DEVICE)
    table_slots = torch.full((capacity,), -1, dtype=torch.int64, device=DEVICE)
    slots, size = probe(table_keys, table_slots, keys, True, 0)
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((unique.numel(),), -1, dtype=torch.int64, device=DEVICE).scatter_(0, inverse, slots)
    assert torch.equal(first[inverse], slots), "one key got two slots"
    assert size == unique.numel() and torch.equal(torch.sort(first).values, torch.arange(size, device=DEVICE))


def test_duplicate_keys_share_a_slot():
    gen = torch.Generator().manual_seed(3)
    pool = random_keys(700, gen)
    check_duplicates_share_slots(pool[torch.randint(0, pool.numel(), (780,), generator=gen).to(DEVICE)])


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: type(o).__name__)
def test_sparse_update_matches_apply(optimizer):
    """In-place fused update == gather -> optimizer.apply -> scatter on the touched rows; the others stay."""
    dim, capacity, n = 24, 300, 120
    width = dim * (1 + len(optimizer.state_names))
    values = torch.randn(capacity, width, device=DEVICE)
    values[:, dim:] = values[:, dim:].abs()  # Adagrad sums and Adam second moments are non-negative
    slots = torch.randperm(capacity, device=DEVICE)[:n]
    grads = torch.randn(n, dim, device=DEVICE)
    for step in (1, 7):
        expected = values.clone()
        expected[slots] = optimizer.apply(values[slots], grads, step)
        sparse_update_(values, slots, grads, optimizer.kind, **optimizer.fused_args(step))
        untouched = torch.ones(capacity, dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        assert torch.equal(values[untouched], expected[untouched])
        torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: type(o).__name__)
def test_device_store_and_embedding_match_reference(optimizer):
    """Training steps through Embedding + DeviceStore on the kernels == the torch path on CPU (rows by key)."""
    gen = torch.Generator().manual_seed(4)
    steps = [(torch.randint(0, 50, (40, 5), generator=gen), torch.randn(40, 5, 8, generator=gen)) for _ in range(3)]

    def train(device):
        emb = Embedding(DeviceStore(dim=8, optimizer=optimizer, initial_capacity=16, device=device))
        sparse_step = SparseDenseOptimizer(emb, None)
        outs = []
        for ids, grad in steps:
            out = emb(ids.to(device))
            out.backward(grad.to(device))
            sparse_step.step()
            outs.append(out.detach().cpu())
        return emb, outs

    reference, expected = train("cpu")
    with fused_kernels(True):
        kernel, actual = train(DEVICE)
        (keys, values), (ref_keys, ref_values) = kernel.backend.export(), reference.backend.export()
        missing = kernel.backend.lookup(torch.tensor([123456789], device=DEVICE), insert=False)
    for out, ref in zip(actual, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(keys, ref_keys)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)
    assert missing.abs().sum() == 0


@gpu
def test_hash_table_under_contention_on_gpu():
    """Millions of keys, heavy duplication and collisions, compiled: duplicates and the encoder stay exact."""
    gen = torch.Generator().manual_seed(5)
    pool = random_keys(600_000, gen)
    keys = pool[torch.randint(0, pool.numel(), (65536 * 26,), generator=gen).to(DEVICE)]
    check_duplicates_share_slots(keys)
    unique = torch.unique(keys)
    encoder = IdEncoder(capacity=1024, device=DEVICE)
    slots = encoder.find_or_insert(unique)
    assert torch.equal(torch.sort(slots).values, torch.arange(unique.numel(), device=DEVICE))
    again = encoder.find_or_insert(torch.cat([unique.flip(0), pool]).unique())
    assert torch.equal(encoder.find(unique), slots) and len(encoder) == pool.numel()
    assert torch.equal(torch.sort(again).values, torch.arange(pool.numel(), device=DEVICE))


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_graph_step_trains_like_the_eager_step(tmp_path, precision):
    """TrainWorker replays DLRM's head from CUDA graphs from its second step on: the losses and the dense weights
    after six steps match the eager step's (up to the atomics' summation order in the per-key gradient sums)."""
    from terarec.actors.train_worker import TrainWorker
    from terarec.core.config import load_config
    from terarec.core.data.synth import write_synthetic
    from terarec.kernels.comm import LocalCommunicator
    from terarec.models import Batch
    from terarec.models.graphed import GraphedHead

    write_synthetic(str(tmp_path), rows=4000, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [Batch(torch.randn(512, 13, generator=generator), torch.randint(0, 5000, (512, 26), generator=generator),
                     torch.randint(0, 2, (512, 1), generator=generator).float()) for _ in range(6)]
    runs = []
    for graphs in (False, True):
        config = load_config(overrides=[f"precision={precision}", f"cuda_graphs={str(graphs).lower()}",
                                        "dlrm.bottom_mlp=[64]", "dlrm.top_mlp=[128,64]", "embedding.dim=32"],
                             flags={"data": str(tmp_path), "batch_size": 512, "model": "dlrm"})
        worker = TrainWorker(config, LocalCommunicator(), torch.device("cuda"))
        losses = torch.stack([worker.train_step(batch) for batch in batches]).cpu()
        assert isinstance(worker._head_graph, GraphedHead) == graphs
        runs.append((losses, [p.detach().cpu() for p in worker.model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = runs
    tolerance = 2e-2 if precision == "bf16" else 1e-4
    assert torch.allclose(graph_losses, eager_losses, rtol=tolerance), (graph_losses, eager_losses)
    for eager, graphed in zip(eager_params, graph_params):
        assert torch.allclose(graphed, eager, rtol=tolerance, atol=tolerance * 0.01)
