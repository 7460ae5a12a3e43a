"""Tiered stores (cached_host, cached_ssd) against the unbounded DeviceStore, a pure-Python cache model, and restarts."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from terarec.store.base import Lookup
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
    """lookup, prefetch of the next batch (the pipeline, as the training loop runs it), then update with random
    grads (fixed by the step's number); returns the rows each lookup gave."""
    seen = []
    for step, keys in enumerate(keys_per_step, start=first_step):
        lookup = store.lookup_for_update(keys)
        seen.append(lookup.rows.cpu())
        if step - first_step + 1 < len(keys_per_step):
            store.prefetch(keys_per_step[step - first_step + 1])
        store.update(lookup, grads_of(step, keys.numel()))
    return seen


def train_planned(store, keys_per_step: list[torch.Tensor], between=None, first_step: int = 0) -> list[torch.Tensor]:
    """As the training loop runs a store that plans lookups (Embedding.prepare): lookup N, plan N+1 inside
    `planning()`, update N (after the plan: its rows stay pinned), `between(step)`, then lookup N+1 of the same
    tensor, which the plan made ready."""
    seen = []
    lookup = store.lookup_for_update(keys_per_step[0])
    for step, keys in enumerate(keys_per_step):
        seen.append(lookup.rows.cpu())
        following = keys_per_step[step + 1] if step + 1 < len(keys_per_step) else None
        if following is not None:
            with store.planning():
                store.plan_lookup(following)
        store.update(lookup, grads_of(first_step + step, keys.numel()))
        if between is not None:
            between(step)
        if following is not None:
            lookup = store.lookup_for_update(following)
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
    """A pure-Python CLOCK/GCLOCK cache with the rules of cache.py, one hand step at a time."""

    def __init__(self, capacity: int, policy: str):
        self.capacity, self.policy = capacity, policy
        self.slots: list[list] = []  # cache slot -> [key, counter, last access, dirty]; occupied slots first
        self.where: dict[int, int] = {}
        self.known: set[int] = set()
        self.hand = self.clock = self.hits = self.misses = self.evictions = self.writebacks = 0

    def touch(self, slot: list) -> None:
        slot[1] = 1 if self.policy == "lru" else min(slot[1] + 1, MAX_COUNT)

    def access(self, keys: list[int], record: bool, write: bool) -> None:
        access, self.clock = self.clock, self.clock + 1
        missed = [key for key in keys if key not in self.where]
        for key in keys:
            if key in self.where:
                slot = self.slots[self.where[key]]
                slot[2] = access
                self.touch(slot)
        if record:
            self.hits += len(keys) - len(missed)
            self.misses += len(missed)
        occupied = len(self.slots)
        free = min(self.capacity - occupied, len(missed))
        places = list(range(occupied, occupied + free))
        self.slots += [[None, 0, access, False] for _ in range(free)]
        while len(places) < len(missed):
            slot = self.slots[self.hand]
            if slot[2] < access and slot[1] == 0:
                self.evictions += 1
                self.writebacks += slot[3]
                del self.where[slot[0]]
                slot[2] = access
                places.append(self.hand)
            elif slot[2] < access:
                slot[1] -= 1
            self.hand = (self.hand + 1) % occupied
        for key, place in zip(missed, places):
            self.slots[place] = [key, 0, access, key not in self.known]
            self.touch(self.slots[place])
            self.where[key] = place
            self.known.add(key)
        if write:
            for key in keys:
                self.slots[self.where[key]][3] = True


def test_two_lookups_before_their_updates_equal_the_device_store(tmp_path):
    """Two forwards before one optimizer step (the second lookup's misses move the first's rows' residency): the
    first update finds its rows again through the encoder rather than the slots its lookup saw."""
    steps = batches("random", 6, 40)
    store = tiered("cached_host", OPTIMIZERS["adagrad"], tmp_path, cache_rows=60)
    reference = DeviceStore(DIM, OPTIMIZERS["adagrad"], seed=3)
    for step in range(0, 6, 2):
        for backend in (store, reference):
            first, second = backend.lookup_for_update(steps[step]), backend.lookup_for_update(steps[step + 1])
            backend.update(first, grads_of(step, 40))
            backend.update(second, grads_of(step + 1, 40))
    assert_same_store(store, reference)


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
    store.cache.drain()  # the last deferred write-backs (no job is in flight after the last lookup)
    got = store.metrics()
    assert model.evictions > 0 and model.writebacks > 0
    assert (got["cache_hits"], got["cache_misses"]) == (model.hits, model.misses)
    assert (got["cache_evictions"], got["cache_writebacks"]) == (model.evictions, model.writebacks)
    assert got["cache_hit_rate"] == pytest.approx(model.hits / (model.hits + model.misses))
    assert got["host_bytes_written"] == model.writebacks * store.value_width * 4
    assert 0 < got["index_bytes_per_row"] <= 64


@pytest.mark.parametrize("io", ["map", "pread"])
def test_host_cache_misses_read_around_it(io, tmp_path):
    """cached_ssd's host cache holds what the GPU cache wrote down: a row it misses is read from the SSD
    table once and not kept (no fill, no victim), and rows written down come back from it as hits."""
    steps = batches("zipf", steps=30, size=60, seed=2)
    store = tiered("cached_ssd", SparseSGD(lr=0.1), tmp_path, cache_rows=80, host_rows=120)
    store.table.io = io
    reference = DeviceStore(DIM, SparseSGD(lr=0.1), seed=3)
    train(store, steps)
    train(reference, steps)
    got = store.metrics()
    assert got["host_cache_fills"] == 0 and got["host_cache_hits"] > 0
    assert got["ssd_bytes_read"] == got["host_cache_misses"] * store.value_width * 4
    assert got["host_cache_evictions"] > 0  # full: rows written down displace others
    assert_same_store(store, reference)


def test_batch_larger_than_the_cache_is_served_in_pieces(tmp_path):
    steps = batches("random", steps=6, size=400)
    store = tiered("cached_ssd", SparseAdam(lr=0.01), tmp_path, cache_rows=64, host_rows=100)
    reference = DeviceStore(DIM, SparseAdam(lr=0.01), seed=3)
    for rows, ref_rows in zip(train(store, steps), train(reference, steps)):
        assert torch.equal(rows, ref_rows)
    assert_same_store(store, reference)


def test_prefetch_reads_the_next_batch_ahead_and_keeps_this_one(tmp_path):
    steps = batches("zipf", steps=10, size=100, seed=2)
    store = tiered("cached_ssd", SparseSGD(lr=0.1), tmp_path, cache_rows=150, policy="lfu", host_rows=200)
    reference = DeviceStore(DIM, SparseSGD(lr=0.1), seed=3)
    for step, keys in enumerate(steps):
        before = store.metrics()
        lookup = store.lookup_for_update(keys)
        after = store.metrics()
        # every row this lookup brought in from below was read ahead by the prefetch: none synchronously
        assert after["cache_fills"] - before["cache_fills"] == after["cache_prefetched"] - before["cache_prefetched"]
        if step + 1 < len(steps):
            store.prefetch(steps[step + 1])
        evictions = store.metrics()["cache_evictions"]
        store.update(lookup, grads_of(step, keys.numel()))
        assert store.metrics()["cache_evictions"] == evictions  # this batch stayed resident until its update
        train(reference, [keys], first_step=step)
    assert store.metrics()["cache_prefetched"] > 100
    unseen = torch.tensor([11, 12, 13])
    probe = torch.cat([steps[0][:5], unseen])
    assert torch.equal(store.lookup(probe, insert=False), reference.lookup(probe, insert=False))
    assert len(store) == len(reference)
    assert_same_store(store, reference)


KINDS = [("cached_host", 0), ("cached_ssd", 0), ("cached_ssd", 6)]  # (kind, host-cache rows)


@pytest.mark.parametrize("kind,host_rows", KINDS)
def test_loaded_rows_land_where_their_keys_live(kind, host_rows, tmp_path):
    """load_items over cached, uncached and new keys (a restore, a bulk load) mid-pipeline, then training on."""
    steps = batches("zipf", steps=12, size=40, seed=6)
    store = tiered(kind, SparseAdam(lr=0.01), tmp_path, cache_rows=50, host_rows=host_rows)
    reference = DeviceStore(DIM, SparseAdam(lr=0.01), seed=3)
    for model in (store, reference):
        train(model, steps[:6])
    store.prefetch(steps[6])
    keys = torch.cat([steps[5][:10], steps[0][:10], torch.arange(30)])  # cached, likely evicted, new
    keys = torch.unique(keys)
    values = torch.rand(keys.numel(), store.value_width, generator=torch.Generator().manual_seed(1))  # Adam: v >= 0
    for model in (store, reference):
        model.load_items(keys, values)
        train(model, steps[6:], first_step=6)
    assert_same_store(store, reference)



@pytest.mark.parametrize("kind,host_rows", KINDS)
def test_row_evicted_with_its_write_back_in_flight_reads_back_written(kind, host_rows, tmp_path):
    """Rows updated, evicted dirty (their write-back deferred to the background job), prefetched again
    at once: the job writes them before it reads them, and an SSD read waits for their queued write."""
    optimizer = SparseAdagrad(lr=0.1)
    store = tiered(kind, optimizer, tmp_path, cache_rows=16, host_rows=host_rows)
    reference = DeviceStore(DIM, optimizer, seed=3)
    first, second = torch.tensor([1, 2, 3, 4]), torch.arange(5, 21)
    for model in (store, reference):
        model.update(model.lookup_for_update(first), grads_of(0, 4))
        model.lookup(second)  # evicts `first`, dirty
    assert store.cache.deferred  # their write-back has not happened yet
    store.prefetch(first)  # the job: write back, then read the same rows
    for model in (store, reference):
        model.update(Lookup(second, None), grads_of(1, 16))  # its lookup was the one before the prefetch
    assert torch.equal(store.lookup(first), reference.lookup(first))
    assert store.metrics()["cache_prefetched"] == 4
    assert_same_store(store, reference)


@pytest.mark.parametrize("kind,host_rows", KINDS)
def test_key_prefetched_then_updated_is_not_read_stale(kind, host_rows, tmp_path):
    """A prefetch reads rows; before the lookup, an update touches them (bringing them in itself): the
    prefetched copies are stale and must be dropped."""
    optimizer = SparseAdam(lr=0.01)
    store = tiered(kind, optimizer, tmp_path, cache_rows=6, host_rows=host_rows)
    reference = DeviceStore(DIM, optimizer, seed=3)
    early, late = torch.arange(10, 16), torch.arange(20, 26)
    for model in (store, reference):
        train(model, [early, late])
    store.prefetch(early)
    for model in (store, reference):
        model.update(Lookup(early, None), grads_of(7, 6))  # without a lookup: the rows come in for the update
    assert torch.equal(store.lookup(early), reference.lookup(early))
    assert store.metrics()["cache_prefetched"] == 0
    assert_same_store(store, reference)


def test_snapshot_taken_mid_pipeline_holds_the_state_of_its_step(tmp_path):
    """lookup N, prefetch N+1 (in flight), update N, snapshot: the snapshot is step N's state, and training
    goes on after it bit-identically."""
    steps = batches("zipf", steps=16, size=60, seed=4)
    optimizer = SparseAdagrad(lr=0.1)
    store = tiered("cached_ssd", optimizer, tmp_path, cache_rows=80, host_rows=40)
    reference = DeviceStore(DIM, optimizer, seed=3)
    train(store, steps[:8])
    lookup = store.lookup_for_update(steps[8])
    store.prefetch(steps[9])
    store.update(lookup, grads_of(8, steps[8].numel()))
    snapshot = store.snapshot()
    train(reference, steps[:9])
    assert_same_store(store, reference)
    at_snapshot = exported(reference)
    train(store, steps[9:], first_step=9)
    train(reference, steps[9:], first_step=9)
    assert_same_store(store, reference)
    reopened = tiered("cached_ssd", optimizer, tmp_path, cache_rows=80)  # the directory at its last snapshot
    assert reopened.snapshot_id == snapshot and reopened.step == 9
    assert all(torch.equal(a, b) for a, b in zip(exported(reopened), at_snapshot))


KILLED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    from test_store_tiered import OPTIMIZERS, row_bytes, train
    from terarec.store import make_store
    steps = torch.load(sys.argv[2])
    optimizer = OPTIMIZERS["adam"]
    store = make_store("cached_ssd", 8, optimizer, seed=3, cache_bytes=60 * row_bytes(optimizer),
                       host_bytes=50 * row_bytes(optimizer), path=sys.argv[1])
    train(store, steps[:10])
    print("snapshot", store.snapshot(), flush=True)
    written = store.metrics()["ssd_bytes_written"]
    step = 10
    while True:  # until killed: evictions keep queueing asynchronous write-backs to the SSD table
        train(store, [steps[10 + step % 10]], first_step=step)
        store.prefetch(steps[10 + (step + 1) % 10])
        step += 1
        print("written after the snapshot", store.metrics()["ssd_bytes_written"] - written, flush=True)
""")


def test_killed_during_asynchronous_write_back_reopens_at_its_last_snapshot(tmp_path):
    steps = batches("random", steps=20, size=100, seed=9)
    torch.save(steps, tmp_path / "steps.pt")
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "ssd"), str(tmp_path / "steps.pt"),
                              str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["snapshot", "1"]
        for _ in range(8):
            written = float(child.stdout.readline().split()[-1])
        assert written > 0  # write-back went on after the snapshot
    finally:
        child.kill()
        child.wait()
    reference = DeviceStore(DIM, OPTIMIZERS["adam"], seed=3)
    train(reference, steps[:10])
    reopened = tiered("cached_ssd", OPTIMIZERS["adam"], tmp_path, cache_rows=60)
    assert reopened.snapshot_id == 1
    assert_same_store(reopened, reference)


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


@pytest.mark.parametrize("io,seed", [("map", 0), ("map", 1), ("chunk-maps", 0), ("pread", 0), ("pread", 2)])
def test_ssd_table_batched_io_matches_a_plain_array(io, seed, tmp_path, monkeypatch):
    """Reads (in the caller's order or already sorted, split among I/O threads; through one range of maps, a map
    per chunk, or coalesced positional calls) and queued writes against a numpy array, across chunk edges,
    snapshots (copy-on-write) and a reopen."""
    from terarec.store import ssd
    from terarec.store.ssd import SsdTable

    monkeypatch.setattr(ssd, "RUNS_PER_READER", 2)  # small reads take the reader threads too
    monkeypatch.setattr(ssd, "ROWS_PER_READER", 8)
    rng = np.random.default_rng(seed)
    rows, width = 2500, 5
    table = SsdTable(tmp_path / "t", value_width=width, meta={"dim": width}, chunk_rows=1024, io=io)
    assert table.io == io  # chunks of 1024 rows are whole pages: `map` gets its one range
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
        probe.sort()  # as a prefetch reads: rows land in place
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
    reopened = SsdTable(tmp_path / "t", value_width=width, meta={"dim": width}, io=io)
    assert np.array_equal(reopened.read(torch.arange(rows)).numpy(), snapshot)
    assert torch.equal(reopened.keys, torch.arange(rows)) and reopened.step == 40


def test_ssd_table_copy_on_write_remaps_in_place_while_reads_run(tmp_path, caplog):
    """Under io=map a write after a snapshot copies the chunk to a new file mapped where the old one was: reads
    see the new rows, the snapshot's file keeps the old ones, and reads of other rows while that write is in
    flight see the right rows. Chunks that are not whole pages cannot share one range: the table says so."""
    import logging

    from terarec.store.ssd import SsdTable

    width, chunk_rows, rows = 4, 1 << 14, 4 << 14
    table = SsdTable(tmp_path / "t", value_width=width, meta={"dim": width}, chunk_rows=chunk_rows, io="map")
    table.reserve(rows)
    table.write(torch.arange(rows), torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, width))
    even, odd = torch.arange(0, rows, 2), torch.arange(1, rows, 2)
    for step in range(1, 5):
        table.commit(torch.arange(rows), step)
        table.write(odd, torch.full((odd.numel(), width), -float(step)))  # queued: copies every chunk, remaps
        for _ in range(3):  # while it runs (no wait: none of these rows is being written)
            assert torch.equal(table.read(even)[:, 0], even.float())
        assert torch.equal(table.read(odd), torch.full((odd.numel(), width), -float(step)))
    snapshot = json.loads((tmp_path / "t" / (tmp_path / "t" / "CURRENT").read_text()).read_text())
    snapshot_file = tmp_path / "t" / snapshot["chunks"][0]["file"]
    assert snapshot_file != Path(table.chunks[0].name)  # written after the snapshot: a new generation
    table.sync()
    assert np.fromfile(snapshot_file, dtype=np.float32).reshape(-1, width)[1, 0] == -3.0  # its step's rows
    with caplog.at_level(logging.WARNING, logger="terarec.store.ssd"):
        small = SsdTable(tmp_path / "u", value_width=5, meta={"dim": 5}, chunk_rows=16, io="map")
    assert small.io == "chunk-maps" and "not whole pages" in caplog.text


def sharded_worker(rank: int, world: int, directory: str, steps: list[torch.Tensor]) -> None:
    """One rank of a gloo world: its slice of every global batch through ShardedRows over a small
    cached_ssd store, with the pipeline (lookup, prefetch of its next slice, update); saves its export."""
    import torch.distributed as dist

    from terarec.kernels.comm import GlooCommunicator
    from terarec.store.sharded import ShardedRows

    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    optimizer = OPTIMIZERS["adagrad"]
    store = make_store("cached_ssd", DIM, optimizer, seed=3, cache_bytes=60 * row_bytes(optimizer),
                       host_bytes=40 * row_bytes(optimizer), path=f"{directory}/ssd-{rank}")
    rows = ShardedRows(store, GlooCommunicator(), num_buckets=16)
    mine = [keys[rank::world] for keys in steps]
    for step, keys in enumerate(mine):
        lookup = rows.lookup_for_update(keys)
        if step + 1 < len(mine):
            rows.prefetch(mine[step + 1])
        rows.update(lookup, exact_grads(step, steps[step])[rank::world])
    torch.save(store.export(), f"{directory}/export-{rank}.pt")
    dist.destroy_process_group()


def exact_grads(step: int, keys: torch.Tensor) -> torch.Tensor:
    """Gradients that are multiples of 1/64: summed over ranks in any order, they give the same floats."""
    return torch.randint(-64, 64, (keys.numel(), DIM), generator=torch.Generator().manual_seed(step)) / 64.0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_pipeline_equals_the_device_store(world, tmp_path):
    import torch.multiprocessing as mp

    steps = batches("zipf", steps=12, size=90, seed=11)
    mp.spawn(sharded_worker, args=(world, str(tmp_path), steps), nprocs=world)
    reference = DeviceStore(DIM, OPTIMIZERS["adagrad"], seed=3)
    for step, keys in enumerate(steps):
        reference.update(reference.lookup_for_update(keys), exact_grads(step, keys))
    shards = [torch.load(tmp_path / f"export-{rank}.pt") for rank in range(world)]
    keys = torch.cat([k for k, _ in shards])
    values = torch.cat([v for _, v in shards])
    order = torch.argsort(keys)
    ref_keys, ref_values = exported(reference)
    assert torch.equal(keys[order], ref_keys)
    assert torch.equal(values[order], ref_values)


def gpu_store(kind: str, optimizer, tmp_path, cache_rows: int, host_rows: int, mode: str | None):
    """A tiered store on the GPU; `mode`, the host table's (copy or uva), where the kind has one."""
    if mode == "uva":
        pytest.importorskip("cupy")
    store = make_store(kind, DIM, optimizer, seed=3, device="cuda", policy="lru",
                       cache_bytes=cache_rows * row_bytes(optimizer), host_bytes=host_rows * row_bytes(optimizer) or None,
                       path=str(tmp_path / "ssd") if kind == "cached_ssd" else None)
    if mode is not None:
        store.table.mode = mode
    return store




@pytest.mark.parametrize("kind,host_rows", [("cached_host", 0), ("cached_ssd", 0), ("cached_ssd", 300)])
@pytest.mark.parametrize("access", ["random", "zipf"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_planned_lookups_equal_the_device_store(kind, host_rows, access, optimizer, tmp_path):
    """Batch N+1 made resident while batch N's update is pending: N's rows pinned, evicted rows written back by
    the background job before it reads the misses into their new slots; bit-identical to the device store."""
    steps = batches(access, steps=30, size=90, seed=7)
    store = tiered(kind, OPTIMIZERS[optimizer], tmp_path, cache_rows=600, host_rows=host_rows)
    reference = DeviceStore(DIM, OPTIMIZERS[optimizer], seed=3)
    for rows, ref_rows in zip(train_planned(store, steps), train(reference, steps)):
        assert torch.equal(rows, ref_rows)
    got = store.metrics()
    assert got["planned_lookups"] == len(steps) - 1
    assert got["cache_evictions"] > 0 and got["cache_writebacks"] > 0 and got["cache_prefetched"] > 0
    assert_same_store(store, reference)


def test_plan_overtaken_by_other_lookups_runs_the_lookup_in_full(tmp_path):
    """Lookups between a plan and its lookup (an evaluation) sweep the cache: the planned rows may be gone,
    so the lookup does not trust the plan, and training stays bit-identical."""
    steps = batches("random", steps=20, size=90, seed=3)
    probes = [torch.unique(torch.cat(steps[: step + 1])) for step in range(len(steps))]  # past the cache's 600
    store = tiered("cached_ssd", SparseAdagrad(lr=0.1), tmp_path, cache_rows=600, host_rows=100)
    reference = DeviceStore(DIM, SparseAdagrad(lr=0.1), seed=3)

    ref_rows, answers = [], {}
    for step, keys in enumerate(steps):  # the reference answers the same probes at the same points
        lookup = reference.lookup_for_update(keys)
        ref_rows.append(lookup.rows)
        reference.update(lookup, grads_of(step, keys.numel()))
        if step % 2 and step >= 5:
            answers[step] = reference.lookup(probes[step], insert=False)

    def evaluate(step):
        if step in answers:
            assert torch.equal(store.lookup(probes[step], insert=False), answers[step])

    for rows, expected in zip(train_planned(store, steps, between=evaluate), ref_rows):
        assert torch.equal(rows, expected)
    assert 0 < store.metrics()["planned_lookups"] < len(steps) - 1
    assert_same_store(store, reference)


def test_snapshot_taken_with_a_plan_in_flight(tmp_path):
    """plan N+1 (new keys inserted, misses being read), update N, snapshot: the snapshot holds step N's rows, the
    keys the plan inserted at their initial rows; training goes on bit-identically after it."""
    steps = batches("zipf", steps=16, size=60, seed=4)
    optimizer = SparseAdagrad(lr=0.1)
    store = tiered("cached_ssd", optimizer, tmp_path, cache_rows=360, host_rows=40)
    reference = DeviceStore(DIM, optimizer, seed=3)
    train_planned(store, steps[:8])
    lookup = store.lookup_for_update(steps[8])
    with store.planning():
        assert store.plan_lookup(steps[9])
    store.update(lookup, grads_of(8, steps[8].numel()))
    snapshot = store.snapshot()
    train(reference, steps[:9])
    ref_keys, ref_values = exported(reference)
    keys, values = exported(store)
    known = torch.isin(keys, ref_keys)
    assert torch.equal(keys[known], ref_keys) and torch.equal(values[known], ref_values)
    assert torch.equal(values[~known], reference.initial_values(keys[~known]))  # planned: fresh, not yet trained
    train_planned(store, steps[9:], first_step=9)  # its first lookup is the plan's
    assert store.metrics()["planned_lookups"] >= 8
    train(reference, steps[9:], first_step=9)
    assert_same_store(store, reference)
    reopened = tiered("cached_ssd", optimizer, tmp_path, cache_rows=360)  # the directory at its last snapshot
    assert reopened.snapshot_id == snapshot and reopened.step == 9
    assert all(torch.equal(a, b) for a, b in zip(exported(reopened), (keys, values)))


def test_embedding_prepare_plans_the_next_forward(tmp_path):
    """The Embedding front as the training loop drives it: prepare(next IDs) while this step's backward is
    pending; the next forward of that tensor reuses the plan; rows and gradients as with the device store."""
    from terarec.models.embedding import Embedding

    rng = torch.Generator().manual_seed(0)
    sparse = [torch.randint(0, 1000, (64, 4), generator=rng) for _ in range(10)]
    fronts = [Embedding(tiered("cached_host", SparseAdam(lr=0.01), tmp_path, cache_rows=1600)),
              Embedding(DeviceStore(DIM, SparseAdam(lr=0.01), seed=3))]
    outputs = [[], []]
    for front, seen in zip(fronts, outputs):
        front.train()
        for step, ids in enumerate(sparse):
            rows = front(ids)
            seen.append(rows.detach().clone())
            if step + 1 < len(sparse):
                front.prepare(sparse[step + 1])
            (rows * torch.randn(rows.shape, generator=torch.Generator().manual_seed(step))).sum().backward()
            front.apply_gradients()
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert fronts[0].backend.metrics()["planned_lookups"] == len(sparse) - 1
    assert_same_store(fronts[0].backend, fronts[1].backend)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,host_rows,mode", [("cached_host", 0, "copy"), ("cached_host", 0, "uva"),
                                                 ("cached_ssd", 250, None)])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("flow", ["prefetch", "planned"])
def test_pipeline_on_the_gpu_equals_the_device_store(kind, host_rows, mode, optimizer, flow, tmp_path):
    """The CUDA paths. prefetch: pinned staging, copies started before the job, the fused update on cache rows.
    planned: the planning stream, the job's stream filling cache slots, pinned rows updated on the caller's
    stream meanwhile."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    store = gpu_store(kind, OPTIMIZERS[optimizer], tmp_path, 150 if flow == "prefetch" else 800, host_rows, mode)
    reference = DeviceStore(DIM, OPTIMIZERS[optimizer], seed=3, device="cuda")
    steps = [keys.cuda() for keys in batches("zipf", steps=40, size=120)]
    for rows, ref_rows in zip((train if flow == "prefetch" else train_planned)(store, steps), train(reference, steps)):
        assert torch.equal(rows, ref_rows)
    got = store.metrics()
    assert got["cache_prefetched"] > 0 and got["cache_evictions"] > 0
    assert got["planned_lookups"] == (0 if flow == "prefetch" else len(steps) - 1)
    assert_same_store(store, reference)


@pytest.mark.parametrize("kind", ["cached_host", "cached_ssd"])
def test_planned_row_evicted_dirty_comes_back_written(kind, tmp_path):
    """A plan evicts batch 0's updated rows (their write-back goes to that plan's background job); a later plan
    needs them again, and its job reads them from below: they come back as updated, never as they were before."""
    universe = torch.from_numpy(np.random.default_rng(1).integers(-(1 << 62), 1 << 62, 200))
    steps = [universe[10 * i: 10 * (i + 1)] for i in range(12)] + [universe[:10].clone()]  # batch 0's keys last
    store = tiered(kind, SparseAdagrad(lr=0.1), tmp_path, cache_rows=60)
    reference = DeviceStore(DIM, SparseAdagrad(lr=0.1), seed=3)
    for rows, ref_rows in zip(train_planned(store, steps), train(reference, steps)):
        assert torch.equal(rows, ref_rows)
    got = store.metrics()
    assert got["planned_lookups"] == len(steps) - 1
    assert got["cache_writebacks"] >= 10 and got[f"{'host' if kind == 'cached_host' else 'ssd'}_bytes_read"] > 0
    assert_same_store(store, reference)
