"""Tiered stores (cached_host, cached_ssd) against the unbounded DeviceStore, a pure-Python cache model, and restarts."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from terarec.store import DamagedTableError, DeviceStore, SparseAdagrad, SparseAdam, SparseSGD, make_store
from terarec.store.cache import MAX_COUNT, METADATA_BYTES_PER_SLOT

DIM = 8
UNIVERSE = 1200  # keys; the caches below hold a few hundred rows at most
OPTIMIZERS = {"sgd": SparseSGD(lr=0.1), "adagrad": SparseAdagrad(lr=0.1), "adam": SparseAdam(lr=0.01)}


def row_bytes(optimizer) -> int:
    return DIM * (1 + len(optimizer.state_names)) * 4 + METADATA_BYTES_PER_SLOT


def batches(access: str, steps: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Unique keys per batch, uniform or Zipf(1.1)-weighted over the key universe (spread-out int64s)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-(1 << 62), 1 << 62, UNIVERSE)
    weights = None if access == "random" else 1.0 / np.arange(1, UNIVERSE + 1) ** 1.1
    weights = None if weights is None else weights / weights.sum()
    return [torch.from_numpy(ids[rng.choice(UNIVERSE, size, replace=False, p=weights)]) for _ in range(steps)]


def grads_of(step: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(step))


def train(store, keys_per_step: list[torch.Tensor], first_step: int = 0) -> list[torch.Tensor]:
    """lookup then update with random grads (fixed by the step's number); returns the rows each lookup gave."""
    seen = []
    for step, keys in enumerate(keys_per_step, start=first_step):
        seen.append(store.lookup(keys).cpu())
        store.update(keys, grads_of(step, keys.numel()))
    return seen


def exported(store) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = store.export()
    order = torch.argsort(keys)
    return keys[order], values[order]


def assert_same_store(store, reference) -> None:
    keys, values = exported(store)
    ref_keys, ref_values = exported(reference)
    assert torch.equal(keys, ref_keys)
    assert torch.equal(values, ref_values)  # bit-identical rows and optimizer state
    assert store.step == reference.step


def tiered(kind: str, optimizer, tmp_path, cache_rows: int, policy: str = "lru", host_rows: int = 0):
    return make_store(kind, DIM, optimizer, seed=3, cache_bytes=cache_rows * row_bytes(optimizer),
                      host_bytes=host_rows * row_bytes(optimizer) or None, policy=policy,
                      path=str(tmp_path / "ssd") if kind == "cached_ssd" else None)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("access", ["random", "zipf"])
@pytest.mark.parametrize("kind,policy,host_rows", [("cached_host", "lru", 0), ("cached_host", "lfu", 0),
                                                   ("cached_ssd", "lru", 0), ("cached_ssd", "lfu", 250)])
def test_bit_identical_to_device_store(kind, policy, host_rows, access, optimizer, tmp_path):
    steps = batches(access, steps=25, size=120)
    store = tiered(kind, OPTIMIZERS[optimizer], tmp_path, cache_rows=150, policy=policy, host_rows=host_rows)
    reference = DeviceStore(DIM, OPTIMIZERS[optimizer], seed=3)
    for rows, ref_rows in zip(train(store, steps), train(reference, steps)):
        assert torch.equal(rows, ref_rows)
    assert len(store) == len(reference) > 3 * 150
    assert store.metrics()["cache_evictions"] > 0
    assert_same_store(store, reference)


class ModelCache:
    """A pure-Python LRU/LFU cache with the rules of cache.py, counting what the store should count."""

    def __init__(self, capacity: int, policy: str):
        self.capacity, self.policy = capacity, policy
        self.rows: dict[int, list] = {}  # key -> [count, stamp, dirty]
        self.known: set[int] = set()
        self.clock = self.hits = self.misses = self.evictions = self.writebacks = 0

    def score(self, key: int):
        count, stamp, _ = self.rows[key]
        return (count, stamp) if self.policy == "lfu" else stamp

    def access(self, keys: list[int], record: bool, write: bool) -> None:
        base = self.clock
        self.clock += len(keys)
        missed = []
        for i, key in enumerate(keys):
            if key in self.rows:
                row = self.rows[key]
                row[0], row[1] = min(row[0] + 1, MAX_COUNT), base + i
            else:
                missed.append((i, key))
        if record:
            self.hits += len(keys) - len(missed)
            self.misses += len(missed)
        over = len(self.rows) + len(missed) - self.capacity
        if over > 0:
            candidates = sorted((k for k in self.rows if self.rows[k][1] < base), key=self.score)
            for key in candidates[:over]:
                self.evictions += 1
                self.writebacks += self.rows.pop(key)[2]
        for i, key in missed:
            self.rows[key] = [1, base + i, key not in self.known]
            self.known.add(key)
        if write:
            for key in keys:
                self.rows[key][2] = True


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("access", ["random", "zipf"])
def test_counts_match_a_python_model(policy, access, tmp_path):
    steps = batches(access, steps=40, size=90, seed=5)
    store = tiered("cached_host", SparseAdagrad(lr=0.1), tmp_path, cache_rows=200, policy=policy)
    model = ModelCache(200, policy)
    train(store, steps)
    for keys in steps:
        model.access(keys.tolist(), record=True, write=False)
        model.access(keys.tolist(), record=False, write=True)
    got = store.metrics()
    assert model.evictions > 0 and model.writebacks > 0
    assert (got["cache_hits"], got["cache_misses"]) == (model.hits, model.misses)
    assert (got["cache_evictions"], got["cache_writebacks"]) == (model.evictions, model.writebacks)
    assert got["cache_hit_rate"] == pytest.approx(model.hits / (model.hits + model.misses))
    assert got["host_bytes_written"] == model.writebacks * store.value_width * 4
    assert 0 < got["index_bytes_per_row"] < 200


def test_batch_larger_than_the_cache_is_served_in_pieces(tmp_path):
    steps = batches("random", steps=6, size=400)
    store = tiered("cached_ssd", SparseAdam(lr=0.01), tmp_path, cache_rows=64, host_rows=100)
    reference = DeviceStore(DIM, SparseAdam(lr=0.01), seed=3)
    for rows, ref_rows in zip(train(store, steps), train(reference, steps)):
        assert torch.equal(rows, ref_rows)
    assert_same_store(store, reference)


def test_lookup_without_insert_and_prefetch(tmp_path):
    steps = batches("zipf", steps=10, size=100, seed=2)
    store = tiered("cached_host", SparseSGD(lr=0.1), tmp_path, cache_rows=150, policy="lfu")
    reference = DeviceStore(DIM, SparseSGD(lr=0.1), seed=3)
    for step, keys in enumerate(steps):
        hits = store.metrics()["cache_hits"]
        store.lookup(keys)
        if step > 0:  # the prefetch staged the known keys of this batch that fit beside the last one
            known = torch.isin(keys, torch.cat(steps[:step])).sum()
            assert store.metrics()["cache_hits"] - hits >= min(known, 50)
        if step + 1 < len(steps):
            store.prefetch(steps[step + 1])
        evictions = store.metrics()["cache_evictions"]
        store.update(keys, grads_of(step, keys.numel()))
        assert store.metrics()["cache_evictions"] == evictions  # the prefetch kept this batch resident
        train(reference, [keys], first_step=step)
    unseen = torch.tensor([11, 12, 13])
    probe = torch.cat([steps[0][:5], unseen])
    assert torch.equal(store.lookup(probe, insert=False), reference.lookup(probe, insert=False))
    assert len(store) == len(reference)
    assert_same_store(store, reference)


REOPEN = textwrap.dedent("""
    import sys, torch
    from terarec.store import SparseAdam, make_store
    store = make_store("cached_ssd", {dim}, SparseAdam(lr=0.01), seed=3, cache_bytes=4000, path=sys.argv[1])
    keys, values = store.export()
    torch.save({{"keys": keys, "values": values, "step": store.step, "snapshot": store.snapshot_id}}, sys.argv[2])
""")


def test_new_process_reopens_the_last_snapshot(tmp_path):
    steps = batches("zipf", steps=30, size=100, seed=7)
    optimizer = SparseAdam(lr=0.01)
    store = tiered("cached_ssd", optimizer, tmp_path, cache_rows=60, host_rows=80)
    reference = DeviceStore(DIM, optimizer, seed=3)
    train(store, steps[:12])
    assert store.snapshot() == 1
    train(store, steps[12:20], first_step=12)
    snapshot = store.snapshot()
    train(reference, steps[:20])
    written = store.metrics()["ssd_bytes_written"]
    train(store, steps[20:], first_step=20)  # after the snapshot: evictions rewrite chunks (copy-on-write), never committed
    assert store.metrics()["ssd_bytes_written"] > written
    out = tmp_path / "reopened.pt"
    script = REOPEN.format(dim=DIM)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ssd"), str(out)], check=True)
    reopened = torch.load(out)
    assert reopened["snapshot"] == snapshot == 2 and reopened["step"] == reference.step
    ref_keys, ref_values = exported(reference)
    order = torch.argsort(reopened["keys"])
    assert torch.equal(reopened["keys"][order], ref_keys)
    assert torch.equal(reopened["values"][order], ref_values)


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("target,how", [("chunk", "flip"), ("chunk", "truncate"), ("keys", "flip"),
                                        ("snapshot", "truncate")])
def test_damaged_file_names_itself(target, how, tmp_path):
    store = tiered("cached_ssd", SparseSGD(lr=0.1), tmp_path, cache_rows=50)
    train(store, batches("random", steps=4, size=40))
    store.snapshot()
    victim = sorted((tmp_path / "ssd").glob(f"{target}-*"))[0]
    damage(victim, how)
    with pytest.raises(DamagedTableError, match=str(victim)):
        tiered("cached_ssd", SparseSGD(lr=0.1), tmp_path, cache_rows=50)


def test_reopening_with_another_optimizer_is_refused(tmp_path):
    store = tiered("cached_ssd", SparseSGD(lr=0.1), tmp_path, cache_rows=50)
    train(store, batches("random", steps=2, size=40))
    store.snapshot()
    with pytest.raises(ValueError, match="SparseAdam"):
        tiered("cached_ssd", SparseAdam(lr=0.1), tmp_path, cache_rows=50)


def test_budgets_are_checked(tmp_path):
    with pytest.raises(ValueError, match="store.path"):
        make_store("cached_ssd", DIM, SparseSGD(), cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="store.policy"):
        make_store("cached_host", DIM, SparseSGD(), cache_bytes=1 << 20, policy="fifo")
    small = make_store("cached_host", DIM, SparseSGD(), cache_bytes=1 << 20, host_bytes=100 * DIM * 4)
    with pytest.raises(MemoryError, match="store.host_bytes"):
        small.lookup(torch.arange(500))
    fraction = make_store("cached_host", DIM, SparseSGD(), cache_bytes=0.01)
    assert fraction.cache.capacity > 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssd_table_batched_io_matches_a_plain_array(seed, tmp_path):
    """Sorted, queued reads and writes against a numpy array, across snapshots (copy-on-write) and a reopen."""
    from terarec.store.ssd import SsdTable

    rng = np.random.default_rng(seed)
    rows, width = 300, 5
    table = SsdTable(tmp_path / "t", value_width=width, meta={"dim": width}, chunk_rows=16)
    table.reserve(rows)
    model = np.zeros((rows, width), dtype=np.float32)  # a new chunk reads as zeros
    for step in range(40):
        slots = rng.choice(rows, rng.integers(1, 120), replace=False)
        values = torch.from_numpy(rng.standard_normal((slots.size, width), dtype=np.float32))
        table.write(torch.from_numpy(slots), values)
        model[slots] = values.numpy()
        values.fill_(float("nan"))  # the table keeps its own copy
        probe = rng.choice(rows, rng.integers(1, 200), replace=False)  # overlaps queued writes
        assert np.array_equal(table.read(torch.from_numpy(probe)).numpy(), model[probe])
        if step % 13 == 12:
            table.commit(torch.arange(rows), step)
    snapshot = model.copy()
    table.commit(torch.arange(rows), 40)
    manifest = json.loads((tmp_path / "t" / (tmp_path / "t" / "CURRENT").read_text()).read_text())
    on_disk = np.concatenate([np.fromfile(tmp_path / "t" / entry["file"], dtype=np.float32).reshape(-1, width)
                              for entry in manifest["chunks"]])
    assert np.array_equal(on_disk[:rows], snapshot)
    table.write(torch.arange(rows), torch.ones(rows, width))  # after the snapshot: never committed
    reopened = SsdTable(tmp_path / "t", value_width=width, meta={"dim": width})
    assert np.array_equal(reopened.read(torch.arange(rows)).numpy(), snapshot)
    assert torch.equal(reopened.keys, torch.arange(rows)) and reopened.step == 40
