"""Store v1: encoder, initial rows, sparse optimizers against torch.optim, snapshots."""
import pytest
import torch

from terarec.store import DeviceStore, IdEncoder, SparseAdagrad, SparseAdam, SparseSGD, initial_rows, load_store, save_store
from terarec.store.keys import EMPTY_KEY, bucket_of, feature_keys


def random_keys(n, generator):
    return torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=generator)


def test_encoder_finds_what_it_inserted_and_grows():
    gen = torch.Generator().manual_seed(1)
    encoder = IdEncoder(capacity=16)
    keys = torch.unique(random_keys(5000, gen))
    slots = encoder.find_or_insert(keys)
    assert sorted(slots.tolist()) == list(range(keys.numel()))
    assert encoder.capacity >= 2 * keys.numel()
    perm = torch.randperm(keys.numel(), generator=gen)
    assert torch.equal(encoder.find(keys[perm]), slots[perm])
    unseen = torch.unique(random_keys(100, gen))
    unseen = unseen[~torch.isin(unseen, keys)]
    assert (encoder.find(unseen) == -1).all()
    mixed = torch.cat([keys[:10], unseen])
    again = encoder.find_or_insert(mixed)
    assert torch.equal(again[:10], slots[:10])
    assert sorted(again[10:].tolist()) == list(range(keys.numel(), keys.numel() + unseen.numel()))


def test_encoder_roundtrip_through_items():
    encoder = IdEncoder()
    keys = torch.tensor([5, -3, 2**62, -(2**63) + 1])
    slots = encoder.find_or_insert(keys)
    copy = IdEncoder.from_items(*encoder.items())
    assert torch.equal(copy.find(keys), slots)


def test_feature_keys_separate_features_and_avoid_the_empty_marker():
    ids = torch.tensor([[7, 7, 7]])
    keys = feature_keys(ids)
    assert keys.unique().numel() == 3
    assert (feature_keys(torch.randint(-2**63, 2**63 - 1, (1000, 26))) != EMPTY_KEY).all()


def test_initial_rows_depend_only_on_seed_and_key():
    keys = torch.tensor([1, 2, 3, 4])
    rows = initial_rows(keys, 8, seed=3, scale=0.1)
    assert torch.equal(initial_rows(keys.flip(0), 8, seed=3, scale=0.1), rows.flip(0))
    assert not torch.equal(initial_rows(keys, 8, seed=4, scale=0.1), rows)
    assert rows.abs().max() <= 0.1 and rows.std() > 0.03
    a, b = DeviceStore(8, SparseSGD(), seed=3, init_scale=0.1), DeviceStore(8, SparseSGD(), seed=3, init_scale=0.1)
    a.lookup(torch.tensor([9, 1, 2]))
    assert torch.equal(a.lookup(keys), b.lookup(keys))  # insertion order does not matter


def test_buckets_cover_the_range_evenly():
    buckets = bucket_of(torch.arange(100_000), 64)
    counts = torch.bincount(buckets, minlength=64)
    assert buckets.min() >= 0 and buckets.max() < 64
    assert counts.min() > 0.8 * counts.float().mean()


OPTIMIZER_PAIRS = [
    (lambda: SparseSGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3), False),
    (lambda: SparseAdagrad(lr=0.3), lambda p: torch.optim.Adagrad(p, lr=0.3), False),
    (lambda: SparseAdam(lr=0.01), lambda p: torch.optim.SparseAdam(p, lr=0.01), True),
]


@pytest.mark.parametrize("make_sparse, make_torch, sparse_grad", OPTIMIZER_PAIRS, ids=["sgd", "adagrad", "adam"])
def test_store_matches_dense_embedding_update_for_update(make_sparse, make_torch, sparse_grad):
    """An nn.Embedding with the same initial rows and torch's optimizer gives the same rows, step by step."""
    gen = torch.Generator().manual_seed(7)
    dim, vocab = 6, 50
    keys = torch.unique(random_keys(vocab, gen))
    store = DeviceStore(dim, make_sparse(), seed=11, init_scale=0.2)
    reference = torch.nn.Embedding(keys.numel(), dim, sparse=sparse_grad)
    with torch.no_grad():
        reference.weight.copy_(initial_rows(keys, dim, seed=11, scale=0.2))
    optimizer = make_torch(reference.parameters())
    for _ in range(8):
        index = torch.randint(0, keys.numel(), (32,), generator=gen)
        target = torch.randn(32, dim, generator=gen)
        # reference
        optimizer.zero_grad()
        ((reference(index) - target) ** 2).sum().backward()
        optimizer.step()
        # store: lookup the unique keys, sum gradients per key, update
        unique_index, inverse = torch.unique(index, return_inverse=True)
        lookup = store.lookup_for_update(keys[unique_index])
        rows = lookup.rows.requires_grad_(True)
        ((rows[inverse] - target) ** 2).sum().backward()
        store.update(lookup, rows.grad)
        seen = torch.unique(index)
        torch.testing.assert_close(store.lookup(keys[seen]), reference.weight[seen].detach(), rtol=1e-5, atol=1e-6)


def test_lookup_without_insert_reads_zeros_and_inserts_nothing():
    store = DeviceStore(4, SparseSGD())
    store.lookup(torch.tensor([1, 2]))
    rows = store.lookup(torch.tensor([2, 99]), insert=False)
    assert len(store) == 2
    assert rows[1].abs().sum() == 0 and rows[0].abs().sum() > 0


def test_store_grows_past_its_initial_capacity():
    store = DeviceStore(4, SparseAdagrad(), device="cpu", initial_capacity=4)
    keys = torch.arange(1000)
    first = store.lookup(keys).clone()
    assert len(store) == 1000
    assert torch.equal(store.lookup(keys), first)


def test_snapshot_roundtrip_and_bucket_filter(tmp_path):
    store = DeviceStore(4, SparseAdam(lr=0.1), seed=2)
    keys = torch.arange(200)
    store.update(store.lookup_for_update(keys), torch.randn(200, 4))
    path = str(tmp_path / "shard.pt")
    save_store(store, path)
    whole = DeviceStore(4, SparseAdam(lr=0.1), seed=2)
    assert load_store(whole, [path]) == 200
    assert whole.step == store.step
    assert torch.equal(whole.export()[1], store.export()[1])
    half = DeviceStore(4, SparseAdam(lr=0.1), seed=2)
    loaded = load_store(half, [path], keep=lambda k: k % 2 == 0)
    assert loaded == 100 and len(half) == 100


def test_snapshot_errors_name_the_file(tmp_path):
    store = DeviceStore(4, SparseSGD())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_store(store, [str(tmp_path / "missing.pt")])
    save_store(store, str(tmp_path / "ok.pt"))
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt"):
        load_store(store, [str(tmp_path / "cut.pt")])
    with pytest.raises(ValueError, match="width"):
        load_store(DeviceStore(4, SparseAdagrad()), [str(tmp_path / "ok.pt")])
