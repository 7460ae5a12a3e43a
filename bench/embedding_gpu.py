"""The GPU embedding path, torch reference vs Triton kernels, at the DLRM shape (B = 65536, 26 features, D = 128).

Times (medians of `triton.testing.do_bench`, warm table): encoder
find_or_insert of the batch's unique keys, the store's sparse update per optimizer, Embedding forward and
forward + backward + update; then the whole DLRM training step three ways: all
eager (TERAREC_FUSED=0), fused dense kernels over the torch embedding path (the
state before the embedding kernels), and everything fused. Writes
bench/results/embedding_gpu-<device>.json and embedding_gpu.md.

    python bench/embedding_gpu.py [--steps 20]
    python bench/embedding_gpu.py --batch 256 --steps 2      # CPU smoke run (both columns are torch there)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
from pathlib import Path

import torch

from kernels import bench_dlrm_step, median_ms  # bench/kernels.py
from results import RESULTS, device_name, record  # bench/results.py
from terarec.kernels import gather as kernels_gather
from terarec.models import Embedding, SparseDenseOptimizer
from terarec.store import DeviceStore, IdEncoder, SparseAdagrad, SparseAdam, SparseSGD, feature_keys
from terarec.store import encoder as store_encoder, optim as store_optim

BATCH, FEATURES, DIM, VOCAB = 65536, 26, 128, 40_000  # VOCAB raw IDs per feature, as bench/kernels.py's step


@contextlib.contextmanager
def fused(enabled: bool):
    os.environ["TERAREC_FUSED"] = "1" if enabled else "0"
    try:
        yield
    finally:
        os.environ.pop("TERAREC_FUSED")


@contextlib.contextmanager
def torch_embedding_path():
    """The embedding path on its torch references while the dense kernels stay fused (the state before)."""
    modules = (store_encoder, store_optim, kernels_gather)
    saved = [module.use_fused for module in modules]
    for module in modules:
        module.use_fused = lambda tensor: False
    try:
        yield
    finally:
        for module, use in zip(modules, saved):
            module.use_fused = use


def both(what: str, make_run, rows: list[dict], **extra) -> dict:
    """Time make_run() under the torch reference and the Triton kernels; one result row."""
    times = {}
    for name, enabled in (("torch", False), ("triton", True)):
        with fused(enabled):
            times[name] = median_ms(make_run())
    row = {"what": what, "torch_ms": round(times["torch"], 3), "triton_ms": round(times["triton"], 3),
           "speedup": round(times["torch"] / times["triton"], 1), **extra}
    rows.append(row)
    print(f"{what:<44} {row['torch_ms']:9.3f} {row['triton_ms']:9.3f} {row['speedup']:7.1f}x", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed DLRM training steps")
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = [torch.randint(0, VOCAB, (args.batch, FEATURES), device=device) for _ in range(4)]
    unique = torch.unique(feature_keys(ids[0]))
    rows: list[dict] = []
    print(f"{'':<44} {'torch ms':>9} {'triton ms':>9} {'speedup':>8}")

    def warm_encoder():
        encoder = IdEncoder(capacity=1 << 22, device=device)
        for batch in ids:
            encoder.find_or_insert(torch.unique(feature_keys(batch)))
        return lambda: encoder.find_or_insert(unique)
    both("encoder find_or_insert, unique keys, warm", warm_encoder, rows, keys=unique.numel())

    grads = torch.randn(unique.numel(), DIM, device=device)
    for optimizer in (SparseSGD(lr=0.01), SparseAdagrad(lr=0.01), SparseAdam(lr=0.001)):
        def warm_store():
            store = DeviceStore(DIM, optimizer, device=device, initial_capacity=1 << 21)
            lookup = store.lookup_for_update(unique)
            return lambda: store.update(lookup, grads)
        both(f"store.update ({type(optimizer).__name__}), encode included", warm_store, rows, rows_updated=unique.numel())

    def warm_embedding(train: bool):
        def make():
            embedding = Embedding(DeviceStore(DIM, SparseSGD(lr=0.01), device=device, initial_capacity=1 << 21))
            sparse_step = SparseDenseOptimizer(embedding, None)
            for batch in ids:
                embedding(batch)
            out_grad = torch.randn(args.batch, FEATURES, DIM, device=device)

            def step():
                if not train:
                    with torch.no_grad():
                        return embedding(ids[0])
                embedding(ids[0]).backward(out_grad)
                sparse_step.step()
            return step
        return make
    both("Embedding forward (no grad)", warm_embedding(False), rows)
    both("Embedding forward + backward + SGD update", warm_embedding(True), rows)

    with torch_embedding_path():
        before = bench_dlrm_step(args.batch, args.steps)
    after = bench_dlrm_step(args.batch, args.steps)
    dlrm = {"eager_ms": after["eager_ms"], "fused_dense_torch_embedding_ms": before["fused_ms"],
            "fused_ms": after["fused_ms"], "speedup_before": round(after["eager_ms"] / before["fused_ms"], 2),
            "speedup": round(after["eager_ms"] / after["fused_ms"], 2), "eager_ms_second_run": before["eager_ms"],
            "samples_per_s_fused": after["samples_per_s_fused"], "config": after["config"]}
    print("DLRM step:", dlrm, flush=True)
    settings = {"batch": args.batch, "features": FEATURES, "dim": DIM, "vocab_per_feature": VOCAB, "steps": args.steps}
    slug = device_name().lower().replace("nvidia ", "").replace(" ", "-")
    record(f"embedding_gpu-{slug}", {"rows": rows, "dlrm_step": dlrm}, settings)
    table = "\n".join(f"| {r['what']} | {r['torch_ms']} | {r['triton_ms']} | {r['speedup']}× |" for r in rows)
    markdown = (
        f"GPU embedding path on {device_name()}, {datetime.date.today().isoformat()}: torch reference "
        f"(TERAREC_FUSED=0) vs Triton kernels; B={args.batch}, {FEATURES} features x {VOCAB} IDs, D={DIM}, fp32, warm "
        f"table ({unique.numel()} unique keys a batch); medians of triton.testing.do_bench.\n\n"
        f"| what | torch ms | Triton ms | speedup |\n| --- | ---: | ---: | ---: |\n{table}\n\n"
        f"Whole DLRM training step (B={args.batch}, {dlrm['config']}): eager {dlrm['eager_ms']} ms "
        f"(again: {dlrm['eager_ms_second_run']} ms); fused dense + torch embedding path "
        f"{dlrm['fused_dense_torch_embedding_ms']} ms ({dlrm['speedup_before']}×); all fused {dlrm['fused_ms']} ms "
        f"(**{dlrm['speedup']}×** eager, {dlrm['samples_per_s_fused']} samples/s).\n")
    Path(RESULTS, "embedding_gpu.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
