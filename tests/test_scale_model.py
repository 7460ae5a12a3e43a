"""The cost model of the sharded step (core/cost_model.py): its arithmetic on a small case worked by hand, the
bytes it predicts against ShardedRows' own counters on a real 2-process gloo run, and `terarec plan`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from terarec.core.cost_model import (DeviceCosts, Fabric, KeyDistribution, Link, bytes_sent_per_step, memory_per_gpu,
                                     pick_wire, predict_step, slowest_worker_wait_ms, wire_row_bytes)
from terarec.kernels.comm import LocalCommunicator
from terarec.store import DeviceStore, SparseSGD
from terarec.store.sharded import ShardedRows

BENCH = Path(__file__).resolve().parents[1] / "bench"

COSTS = DeviceCosts(device="hand", batch=1000, dim=4, unique_keys=100, dense_params=1000, dense_ms={"fp32": 2.0},
                    store_ms=1.0, pack_ms=0.5, codec_ms={"fp32": 0.0, "bf16": 0.1, "fp16": 0.1, "int8": 0.2})
# 2 GPUs a node at 1 GB/s and 10 µs; the network 0.5 GB/s and 20 µs per GPU; no efficiency loss
FABRIC = Fabric(Link("node", 1.0, 10.0), Link("net", 0.5, 20.0), gpus_per_node=2, nics_per_node=2, efficiency=1.0)


def test_four_gpus_on_two_nodes_by_hand():
    p = predict_step(COSTS, None, 4, FABRIC, "int8", unique_keys=100, owned_keys=50)
    # int8 rows: 4 bytes + a 4-byte scale. Each all-to-all carries 800 B (keys 100 x 8, rows 100 x 8, grads
    # 100 x 8): 1/4 to itself, 1/4 over the node's link (200 ns), 2/4 over the network (400 B / 0.5 GB/s = 800 ns),
    # both at once, plus two network latencies (count exchange + payload): 40.8 µs, three times.
    assert p.ms["exchange"] == pytest.approx(3 * 40.8e-3)
    # dense all-reduce of 1000 fp32: 2 * 3/4 * 4000 B / 0.5 GB/s = 12 µs, tree latency 2 * log2(4) * 20 µs = 80 µs
    assert p.ms["all_reduce"] == pytest.approx(0.092)
    # dense 2 + store 1 ms * 50/100 owned keys + pack 0.5 + int8 codec 0.2
    assert p.ms["dense"] + p.ms["store"] + p.ms["pack"] + p.ms["codec"] == pytest.approx(3.2)
    assert p.ms["step"] == pytest.approx(3.2 + 0.1224 + 0.092)
    assert p.samples_per_s_per_gpu == pytest.approx(1000 / 3.4144e-3)
    assert p.wire_bytes == pytest.approx((8 + 2 * 8) * 100 * 3 / 4)  # 3/4 of what it sends leaves the GPU
    overlapped = predict_step(COSTS, None, 4, FABRIC, "int8", overlap=True, unique_keys=100, owned_keys=50)
    assert overlapped.ms["step"] == pytest.approx(3.2)
    # the wait for the slowest worker adds to the step as given, overlapped or not
    waiting = predict_step(COSTS, None, 4, FABRIC, "int8", unique_keys=100, owned_keys=50, wait_ms=0.5)
    assert waiting.ms["step"] == pytest.approx(p.ms["step"] + 0.5) and waiting.ms["wait"] == 0.5
    # a count exchange measured apart (30 µs) replaces the payload's latency in the first half of each all-to-all
    counted = Fabric(Link("node", 1.0, 10.0), Link("net", 0.5, 20.0, count_latency_us=30.0), gpus_per_node=2,
                     nics_per_node=2, efficiency=1.0)
    assert predict_step(COSTS, None, 4, counted, "int8", unique_keys=100).ms["exchange"] == pytest.approx(3 * 50.8e-3)


def test_wait_for_the_slowest_worker_by_hand():
    # one stretch of compute a step; worker 0 takes 1 or 3 ms, worker 1 always 2: the slower of the two takes
    # max(1, 2) = 2 or max(3, 2) = 3, equally likely: 2.5 ms where the mean worker takes 2
    assert slowest_worker_wait_ms([[[1.0], [3.0]], [[2.0], [2.0]]]) == pytest.approx(0.5)
    # a second stretch where both always take 4 ms adds nothing; three workers of 1 or 3 ms: the max is 1 only
    # when all three draw 1 (1/8), so E[max] = 1/8 + 3 * 7/8 = 2.75 against a mean of 2
    assert slowest_worker_wait_ms([[[1.0, 4.0], [3.0, 4.0]], [[2.0, 4.0], [2.0, 4.0]]]) == pytest.approx(0.5)
    assert slowest_worker_wait_ms([[[1.0], [3.0]]] * 3) == pytest.approx(0.75)
    assert slowest_worker_wait_ms([[[5.0], [5.0]]] * 4) == 0.0  # no spread, no wait


def test_one_gpu_has_no_exchange_and_pcie_carries_the_network_share():
    p = predict_step(COSTS, None, 1, FABRIC, "int8", unique_keys=100)
    assert p.ms["step"] == pytest.approx(2.0 + 1.0) and p.wire_bytes == 0
    pcie = Fabric(Link("pcie", 1.0, 0.0, host_bus=True), Link("net", 10.0, 0.0), gpus_per_node=2, efficiency=1.0)
    # 2/4 + 1/4 of the 800 B cross the PCIe link: 600 ns per all-to-all, the network's 40 ns run beside it
    assert predict_step(COSTS, None, 4, pcie, "int8", unique_keys=100).ms["exchange"] == pytest.approx(3 * 600e-6)


def test_wire_rows_unique_keys_memory_and_pick():
    assert [wire_row_bytes(w, 128) for w in ("fp32", "bf16", "fp16", "int8")] == [512, 256, 256, 132]
    assert bytes_sent_per_step(10, 4, "fp32") == 10 * (8 + 2 * 16)
    uniform = KeyDistribution((4,), 0.0)  # 4 IDs equally likely: 1 - (3/4)^2 of each is seen in 2 draws
    assert uniform.expected_unique(2) == pytest.approx(4 * (1 - 0.75**2))
    tiers = memory_per_gpu(1000, 4, 1, 4, "device", None, None, 80e9, 256e9, dense_params=1000, dense_optimizer_states=2)
    assert tiers["gpu_rows"] == 250 * (4 * 2 * 4 + 32) and tiers["gpu_dense"] == 1000 * 4 * 4
    ssd = memory_per_gpu(1000, 4, 1, 4, "cached_ssd", 1000, 2000, 80e9, 256e9, dense_params=0, dense_optimizer_states=0)
    assert ssd["gpu_rows"] == 1000 and ssd["host_rows"] == 2000 and ssd["ssd_rows"] == 250 * 32
    fast = {w: predict_step(COSTS, None, 4, FABRIC, w, unique_keys=100, owned_keys=50) for w in ("fp32", "bf16", "int8")}
    assert pick_wire(fast)[0] == "fp32"  # the exchange is 4% of the step: int8 gains < 3% after its codec
    slow = Fabric(Link("node", 1e-3, 10.0), Link("net", 1e-3, 20.0), gpus_per_node=2, efficiency=1.0)
    # on a slow link a narrow wire wins; at dim 4 an int8 row (4 B + a 4-byte scale) is as wide as bf16's and its
    # codec costs more, so bf16 is the pick
    assert pick_wire({w: predict_step(COSTS, None, 4, slow, w, unique_keys=100, owned_keys=50)
                      for w in ("fp32", "bf16", "int8")})[0] == "bf16"


def test_bytes_per_step_match_the_exchange_counters(monkeypatch):
    """Two gloo processes look up and update Zipf keys through ShardedRows (bench/scale_model.py --measure-wire)."""
    monkeypatch.syspath_prepend(str(BENCH))  # the spawned workers import scale_model too
    import scale_model
    settings = {"dim": 8, "vocab": 5000, "exponents": [1.05], "batches": [64, 256]}
    ranks = scale_model.spawn(scale_model.wire_rank, 2, settings)
    for cells in zip(*ranks):
        wire, dim = cells[0]["wire"], settings["dim"]
        for cell in cells:  # every byte ShardedRows counts went through the communicator, to itself or to the peer
            assert cell["bytes_sent"] == cell["to_self"] + cell["to_peers"] > 0
        # over both workers, the rows served back equal the keys asked for: the model's count is exact
        assert sum(c["bytes_sent"] for c in cells) == bytes_sent_per_step(sum(c["unique_keys"] for c in cells), dim, wire)
        to_peers = sum(c["to_peers"] for c in cells) / sum(c["bytes_sent"] for c in cells)
        assert 0.4 < to_peers < 0.6, (wire, to_peers)  # buckets spread keys evenly: half leave each worker
        for cell in cells:  # each of the step's all-to-alls (keys, rows, grads) ran under its part's timer, and the
            # parts lie inside the exchange's own timer (what share of it they take is a timing: bench/, not here)
            parts = cell["exchange_parts_s"]
            assert cell["exchange_calls"] == len(scale_model.EXCHANGE_PARTS), cell["exchange_calls"]
            assert set(parts) == {"counts", *scale_model.EXCHANGE_PARTS} and min(parts.values()) > 0, parts
            assert sum(parts.values()) <= cell["exchange_s"], (parts, cell["exchange_s"])
    # the model's exchange by those parts adds up to its exchange: 3 count exchanges at 20 µs, then each payload
    # (keys, rows, gradients of 800 B) a latency + its network share, as in the hand-worked case above
    parts = scale_model.exchange_parts_ms(100, 4, 4, FABRIC, "int8")
    assert parts["counts"] == pytest.approx(3 * 20e-3) and parts["rows"] == pytest.approx(20.8e-3)
    assert sum(parts.values()) == pytest.approx(predict_step(COSTS, None, 4, FABRIC, "int8", unique_keys=100).ms["exchange"])
    # the link fit recovers a latency and a bandwidth from points on their line (1 ms + bytes / 100 MB/s)
    latency, bandwidth = scale_model.fit_link([(n, 1e-3 + n / 1e8) for n in (512, 65536, 2**20, 2**22)])
    assert latency == pytest.approx(1e-3) and bandwidth == pytest.approx(1e8)


def test_plan_prints_a_prediction_and_rejects_bad_input(tmp_path, capsys):
    from terarec.core.data.synth import write_synthetic
    from terarec.platform.cli import main

    write_synthetic(str(tmp_path / "data"), rows=3000)
    config = tmp_path / "job.yaml"
    config.write_text(f"model: dlrm\ndata: {tmp_path / 'data'}\nbatch_size: 4096\nembedding: {{dim: 32}}\n")
    with pytest.raises(SystemExit) as done:
        main(["plan", "--config", str(config), "--gpus", "16", "--link", "eth100"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "16 GPUs (2 nodes)" in out and "pick: embedding.comm_dtype=" in out and "GPU " in out
    for bad in (["--gpus", "0"], ["--gpus", "4", "--link", "pcie9"], ["--gpus", "8192"]):
        with pytest.raises(SystemExit) as done:
            main(["plan", "--config", str(config), *bad])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and err.startswith("terarec plan: error:"), err


def test_counting_communicator_probes_and_spans_each_all_to_all(monkeypatch):
    """The validation's one-worker step: a probe at each point where a sharded step calls an all-to-all, inside
    that call's span (so that the compute between spans leaves the probes out)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import scale_model

    probed = []
    comm = scale_model.CountingCommunicator(LocalCommunicator(), probe=lambda: probed.append(comm.calls))
    rows = ShardedRows(DeviceStore(4, SparseSGD()), comm, 16)
    rows.update(rows.lookup_for_update(torch.arange(10)), torch.ones(10, 4))
    assert probed == [1, 2, 3]  # keys, rows, gradients: one probe each
    assert len(comm.spans) == 3 and all(start <= end for start, end in comm.spans)
    assert comm.spans[0][1] <= comm.spans[1][0] and comm.spans[1][1] <= comm.spans[2][0]
    assert comm.to_self == bytes_sent_per_step(10, 4, "fp32") and comm.to_peers == 0  # a world of one
