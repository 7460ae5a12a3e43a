"""The training loop over every store option: a cache far smaller than the table trains like all-in-memory.

The cache here holds fewer rows than one batch touches, so batches are served in pieces; elementwise kernels then
split their vector and scalar tails differently, hence a tolerance of float rounding rather than bit equality
(bit equality with batches that fit is tested in test_store_tiered.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from terarec.actors.train_worker import TrainWorker
from terarec.kernels.comm import LocalCommunicator
from terarec.core.config import load_config


def train(data, tmp_path, kind, comm=None, cache_bytes=60000):
    overrides = [f"store.kind={kind}", f"store.cache_bytes={cache_bytes}", "embedding.dim=8",
                 "embedding.optimizer=adam", "embedding.lr=0.01", "log_every=5"]
    if kind == "cached_ssd":  # with a host cache in front of the SSD table, also smaller than the table
        overrides += [f"store.path={tmp_path / 'ssd'}", "store.host_bytes=120000"]
    config = load_config(overrides=overrides, flags={"data": data, "steps": 12, "batch_size": 512, "seed": 2})
    worker = TrainWorker(config, comm or LocalCommunicator(), torch.device("cpu"))
    worker.train()
    return worker


def assert_trained_alike(tiered, reference) -> None:
    """Same keys; rows, optimizer state and dense weights equal up to float rounding."""
    ref_keys, ref_values = reference.store.export()
    keys, values = tiered.store.export()
    assert torch.equal(ref_keys, keys)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-7)
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(tiered.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["cached_host", "cached_ssd"])
def test_tiered_stores_train_like_the_device_store(synth_data, tmp_path, kind):
    reference = train(synth_data, tmp_path, "device")
    tiered = train(synth_data, tmp_path, kind)
    metrics = tiered.store.metrics()
    assert metrics["cache_evictions"] > 0 and metrics["cache_rows"] < len(tiered.store) / 2  # the cache was too small
    assert_trained_alike(tiered, reference)
    assert reference.evaluate()["auc"] == pytest.approx(tiered.evaluate()["auc"], abs=1e-5)


@pytest.mark.parametrize("kind", ["cached_host", "cached_ssd"])
def test_planned_lookups_train_like_the_device_store(synth_data, tmp_path, kind):
    """A cache that holds several batches: the loop plans each next lookup (Embedding.prepare) after queuing the
    step's update, and trains as the device store does."""
    reference = train(synth_data, tmp_path, "device")
    tiered = train(synth_data, tmp_path, kind, cache_bytes=12_000_000)
    assert tiered.store.metrics()["planned_lookups"] == 11  # every lookup but the first
    assert_trained_alike(tiered, reference)


def sharded_run(rank: int, world: int, data: str, directory: str, kind: str) -> None:
    """One rank of a gloo world (no Ray): the training loop, with the pipeline's early key exchange for tiered
    stores; saves this rank's export. (Two such runs of the device store already differ by float rounding, about
    1e-7: CPU reductions under two processes are not bit-reproducible, hence a tolerance below.)"""
    import torch.distributed as dist

    from terarec.kernels.comm import GlooCommunicator

    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous-{kind}", rank=rank, world_size=world)
    worker = train(data, tmp_path=Path(directory) / f"{kind}-{rank}", kind=kind, comm=GlooCommunicator(),
                   cache_bytes=100_000)
    torch.save({"export": worker.store.export(), "metrics": worker.store.metrics()}, f"{directory}/{kind}-{rank}.pt")
    dist.destroy_process_group()


def test_two_workers_prefetch_through_the_key_exchange(synth_data, tmp_path):
    import torch.multiprocessing as mp

    for run in ("device", "cached_host", "cached_ssd"):
        mp.spawn(sharded_run, args=(2, synth_data, str(tmp_path), run), nprocs=2)
    for rank in range(2):
        reference = torch.load(tmp_path / f"device-{rank}.pt")
        for kind in ("cached_host", "cached_ssd"):
            tiered = torch.load(tmp_path / f"{kind}-{rank}.pt")
            assert tiered["metrics"]["cache_evictions"] > 0
            assert tiered["metrics"]["cache_prefetched"] > 0  # rows staged for keys another rank asked for next
            assert torch.equal(tiered["export"][0], reference["export"][0])
            torch.testing.assert_close(tiered["export"][1], reference["export"][1], rtol=1e-5, atol=1e-6)
