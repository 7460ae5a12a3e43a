"""A table far larger than the GPU cache, trained by the worker's own step: device vs cached_host vs cached_ssd.

The table holds --rows keys (default 40M) of dim 128 with Adagrad state: 1 KiB a key, 41 GB. It is loaded in
bulk (`load_items`, which writes straight to the bottom tier), the GPU cache (--cache-gb, 4 GB) is warmed on
the unique keys of --warm-batches batches, then DLRM (bench/kernels.py's Criteo shapes) trains --steps steps
through `TrainWorker.train_step`, the step `terarec train` runs, prefetch of the next batch included. Batches
are made on the GPU (the reader is left out of the measurement): 26 features of Zipf(--zipf) IDs over
rows / 26 per feature, and each ID is, with chance --new-ids, a brand-new one (new IDs keep arriving).

One kind per call fits the device tool's limit of 10 minutes; each call merges its row into
bench/results/store_large-<device>.json (`figures.rows`: kind, table_gb, cache_gb, host_cache_gb, gpu_hit,
samples_per_s, vs_device, and the index bytes per row by tier; below the GPU cache, the milliseconds a step
waited for the prefetch and spent in SSD reads and writes). --ssd-io picks how the SSD table moves rows; each
way keeps its own row.

    python bench/store_large.py --kind device
    python bench/store_large.py --kind cached_host
    python bench/store_large.py --kind cached_ssd --scratch /tmp/terarec-large   # a directory on the disk
    python bench/store_large.py --kind cached_ssd --ssd-io pread --scratch /tmp/terarec-large
    python bench/store_large.py --kind cached_ssd --warm-batches 600 --warm-steps 700   # steady state, write-back on
    python bench/store_large.py --kind cached_host --profile /tmp/prof   # then where a step's time goes
    python bench/store_large.py --smoke                 # every kind, tiny, on the CPU (to /tmp)

--profile DIR runs --profile-steps more steps under torch.profiler after the timed ones, with the store's own
calls marked (lookup, sweep, eviction, prefetch, ...), and writes DIR/<kind>.trace.json.gz and DIR/<kind>.txt
(the busiest operations, and how much of the steps' wall time the GPU was busy).
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from results import RESULTS, device_name, record  # bench/results.py
from store import compile_variants  # bench/store.py
from terarec.actors.train_worker import TrainWorker
from terarec.core.config import load_config
from terarec.core.data.synth import write_synthetic
from terarec.kernels.comm import LocalCommunicator
from terarec.models import Batch
from terarec.store import feature_keys
from terarec.store.ssd import IO_MODES

FEATURES = 26
KINDS = ("device", "cached_host", "cached_ssd")
HEADROOM = 1.1  # tables are reserved for this many times the loaded rows, so new IDs never make them grow


class Keys:
    """Batches of [B, 26] raw IDs: rank r of [0, vocab) with chance ~ 1 / (r + 1)^zipf, or, with chance
    `new_ids`, an ID never drawn before (vocab, vocab + 1, ...), on `device`."""

    def __init__(self, vocab: int, zipf: float, new_ids: float, device: torch.device, seed: int = 0):
        weights = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** zipf
        self.cdf = torch.from_numpy(np.cumsum(weights / weights.sum())).to(device)
        self.vocab, self.new_ids, self.device = vocab, new_ids, device
        self.generator = torch.Generator(device).manual_seed(seed)
        self.next_new = vocab

    def sparse(self, size: int) -> torch.Tensor:
        g = self.generator
        u = torch.rand((size, FEATURES), generator=g, device=self.device, dtype=torch.float64)
        ids = torch.searchsorted(self.cdf, u * self.cdf[-1]).clamp_(max=self.vocab - 1)
        new = torch.rand((size, FEATURES), generator=g, device=self.device) < self.new_ids
        count = int(new.sum())
        ids[new] = torch.arange(self.next_new, self.next_new + count, device=self.device)
        self.next_new += count
        return ids

    def batch(self, size: int) -> Batch:
        g = self.generator
        return Batch(torch.randn((size, 13), generator=g, device=self.device), self.sparse(size),
                     torch.randint(0, 2, (size, 1), generator=g, device=self.device).float())


def make_worker(args, kind: str, data: str, scratch: Path, device: torch.device) -> TrainWorker:
    overrides = [f"store.kind={kind}", f"embedding.dim={args.dim}", "embedding.optimizer=adagrad", "embedding.lr=0.01",
                 f"dlrm.bottom_mlp={args.bottom_mlp}", f"dlrm.top_mlp={args.top_mlp}", "precision=tf32"]
    if kind != "device":
        overrides.append(f"store.cache_bytes={args.cache_gb * 1e9:.0f}")
    if kind == "cached_ssd":
        overrides += [f"store.path={scratch / 'ssd'}", f"store.host_bytes={args.host_cache_gb * 1e9:.0f}"]
    config = load_config(overrides=overrides, flags={"data": data, "batch_size": args.batch, "steps": 1 << 30,
                                                     "seed": 0})
    return TrainWorker(config, LocalCommunicator(), device)


def bulk_load(store, vocab: int, device: torch.device, chunk_keys: int) -> None:
    """Every (feature, ID < vocab) key with its initial row, in chunks, straight to where it lives."""
    if hasattr(store, "cache"):  # once, with room for the new IDs: no table grows by doubling while timed
        store.cache.reserve(int(HEADROOM * vocab * FEATURES))
    per_chunk = max(1, chunk_keys // FEATURES)
    for start in range(0, vocab, per_chunk):
        ids = torch.arange(start, min(start + per_chunk, vocab), device=device)
        keys = feature_keys(ids.unsqueeze(1).expand(-1, FEATURES)).reshape(-1)
        store.load_items(keys, store.initial_values(keys))


def warm(store, keys: Keys, batch: int, batches: int) -> None:
    """Lookups of the unique keys of `batches` batches, 8 at a time: the caches hold the recent working set."""
    for start in range(0, batches, 8):
        sparse = torch.cat([keys.sparse(batch) for _ in range(min(8, batches - start))])
        store.lookup(torch.unique(feature_keys(sparse)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The calls whose time a profile names: (class, method) of the store's layers and the worker's step.
PROFILED = (("terarec.store.tiered", "TieredStore", ("_lookup", "update", "prefetch", "_settle", "_slots", "_fetch")),
            ("terarec.store.cache", "CacheLevel", ("resident", "_make_room", "_sweep", "_evict", "_write_down",
                                                 "touch", "missing", "read", "write", "drain")),
            ("terarec.store.encoder", "IdEncoder", ("find", "find_or_insert")),
            ("terarec.store.device", "DeviceStore", ("lookup", "lookup_for_update", "update")),
            ("terarec.actors.train_worker", "TrainWorker", ("_forward",)),
            ("terarec.models.optimizer", "SparseDenseOptimizer", ("step",)))


def mark_calls() -> None:
    """Wrap the PROFILED methods in torch.profiler.record_function, so a trace names them."""
    import importlib

    for module_name, class_name, methods in PROFILED:
        cls = getattr(importlib.import_module(module_name), class_name)
        for method in methods:
            original = getattr(cls, method, None)
            if original is None or getattr(original, "_marked", False):
                continue

            def marked(*a, __original=original, __name=f"{class_name}.{method}", **kw):
                with torch.profiler.record_function(__name):
                    return __original(*a, **kw)

            marked._marked = True
            setattr(cls, method, functools.wraps(original)(marked))


def busy_share(trace: dict) -> float:
    """The share of the profiled span in which at least one GPU kernel or copy ran."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    if not spans:
        return 0.0
    busy, (start, end) = 0.0, spans[0]
    first = start
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy / (end - first) if end > first else 0.0


def profile_steps(args, worker, keys: "Keys", kind: str, device: torch.device) -> None:
    """--profile-steps steps under torch.profiler: a trace and a summary in --profile."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    batches = [keys.batch(args.batch) for _ in range(args.profile_steps + 1)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for step in range(args.profile_steps):
            with torch.profiler.record_function(f"step {step}"):
                worker.train_step(batches[step], batches[step + 1])
        sync(device)
    raw = out / f"{kind}.trace.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with gzip.open(out / f"{kind}.trace.json.gz", "wt") as f:
        json.dump(trace, f)
    raw.unlink()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=60)
    table_gpu = prof.key_averages().table(sort_by=sort, row_limit=40)
    summary = f"{kind}: GPU busy {busy_share(trace):.1%} of the profiled steps\n\nby CPU time\n{table}\n\nby device time\n{table_gpu}\n"
    (out / f"{kind}.txt").write_text(summary)
    print(summary.splitlines()[0], flush=True)


def run_kind(args, kind: str, data: str, device: torch.device) -> dict:
    vocab = args.rows // FEATURES
    scratch = Path(args.scratch) / kind
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        worker = make_worker(args, kind, data, scratch, device)
        store = worker.store
        started = time.perf_counter()
        bulk_load(store, vocab, device, args.chunk_keys)
        if kind == "cached_ssd":
            store.table.io = args.ssd_io
            store.table.sync()  # the load's write-back to the disk ends here, not inside the timed steps
        sync(device)
        load_s = time.perf_counter() - started
        print(f"{kind}: loaded {len(store):,} rows in {load_s:.0f}s", flush=True)
        keys = Keys(vocab, args.zipf, args.new_ids, device)
        started = time.perf_counter()
        warm(store, keys, args.batch, args.warm_batches)
        compile_variants(store, torch.unique(feature_keys(keys.sparse(args.batch))))
        # the dense kernels' compiles and the first prefetch; more steps (--warm-steps) leave trained, dirty rows
        # in the GPU cache, so that the timed steps evict into the host cache and write back as a long run does
        batch = keys.batch(args.batch)
        for _ in range(args.warm_steps):
            following = keys.batch(args.batch)
            worker.train_step(batch, following)
            batch = following
        sync(device)
        warm_s = time.perf_counter() - started
        batches = [keys.batch(args.batch) for _ in range(args.steps + 1)]
        before = store.metrics()
        sync(device)
        started = time.perf_counter()
        for step in range(args.steps):
            worker.train_step(batches[step], batches[step + 1])
        sync(device)
        seconds = time.perf_counter() - started
        after = store.metrics()
        if args.profile:
            profile_steps(args, worker, keys, kind, device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    looked = delta.get("cache_hits", 0.0) + delta.get("cache_misses", 0.0)
    row_bytes = store.value_width * 4
    row = {"kind": kind, "table_gb": round(len(store) * row_bytes / 1e9, 3),
           "cache_gb": round(after.get("cache_capacity_rows", 0.0) * row_bytes / 1e9, 3),
           "host_cache_gb": round(after.get("host_cache_capacity_rows", 0.0) * row_bytes / 1e9, 3),
           "gpu_hit": round(delta["cache_hits"] / looked, 4) if looked else 1.0,
           "samples_per_s": round(args.steps * args.batch / seconds),
           "step_ms": round(seconds / args.steps * 1e3, 2), "load_s": round(load_s, 1), "warm_s": round(warm_s, 1),
           "rows": len(store), "unique_keys_per_step": round(delta.get("lookups", 0.0) / args.steps),
           "warm_batches": args.warm_batches, "warm_steps": args.warm_steps, "zipf": args.zipf}
    if "host_cache_hits" in delta:
        host_looked = delta["host_cache_hits"] + delta["host_cache_misses"]
        row["host_cache_hit"] = round(delta["host_cache_hits"] / host_looked, 4) if host_looked else 1.0
    if "cache_prefetched" in delta and delta.get("cache_fills"):
        row["prefetched_share"] = round(delta["cache_prefetched"] / delta["cache_fills"], 4)
    if kind != "device":  # where a step's time goes below the GPU cache (SSD writes run in the background)
        row["ms_per_step"] = {name: round(delta.get(key, 0.0) / args.steps * 1e3, 2) for name, key in
                              (("waiting_for_prefetch", "prefetch_wait_s"), ("ssd_read", "ssd_read_s"),
                               ("ssd_write", "ssd_write_s"))}
    if kind == "cached_ssd":
        row["ssd_io"] = args.ssd_io
    row["index_bytes_per_row"] = {tier: round(value, 1) for tier, value in store.index_bytes_per_row().items()}
    print(json.dumps(row), flush=True)
    return row


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """This call's rows over those already recorded for other kinds; vs_device against the device row."""
    def measured_as(row: dict) -> tuple:  # a row for each way of I/O (rows before it: map), GPU cache size,
        return (row["kind"], row.get("ssd_io", "map" if row["kind"] == "cached_ssd" else None),  # warm-up, skew
                round(row["cache_gb"]), row.get("warm_batches", 120), row.get("warm_steps", 3), row.get("zipf", 1.45))

    def workload(row: dict) -> tuple:
        return row.get("warm_batches", 120), row.get("zipf", 1.45)


    kept = json.loads(path.read_text())["figures"]["rows"] if path.exists() else []
    measured = {measured_as(row) for row in rows}
    merged = [r for r in kept if measured_as(r) not in measured] + rows
    merged.sort(key=lambda r: (KINDS.index(r["kind"]), workload(r), r["cache_gb"]))
    devices = {workload(r): r["samples_per_s"] for r in merged if r["kind"] == "device"}
    for r in merged:  # against the device row of the same warm-up and skew where there is one
        device_rate = devices.get(workload(r), next(iter(devices.values()), None))
        r["vs_device"] = round(r["samples_per_s"] / device_rate, 3) if device_rate else None
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    parser.add_argument("--rows", type=int, default=40_000_000, help="keys loaded before training")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--cache-gb", type=float, default=4.0, help="store.cache_bytes, in GB")
    parser.add_argument("--host-cache-gb", type=float, default=8.0, help="cached_ssd's host cache (store.host_bytes)")
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--zipf", type=float, default=1.45,
                        help="ID skew; 1.45 puts a 4 GB cache near 90%% hit at 40M keys (Che's approximation)")
    parser.add_argument("--new-ids", type=float, default=0.001, help="chance that an ID is a brand-new one")
    parser.add_argument("--warm-batches", type=int, default=240, help="batches whose keys warm the caches")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps")
    parser.add_argument("--warm-steps", type=int, default=3,
                        help="training steps before timing (after the lookup-only warm-up); ~700 fill cached_ssd's "
                             "host cache with evicted dirty rows")
    parser.add_argument("--chunk-keys", type=int, default=1 << 21, help="keys per bulk-load call")
    parser.add_argument("--ssd-io", choices=IO_MODES, default="map", help="how the SSD table moves rows (store/ssd.py)")
    parser.add_argument("--bottom-mlp", default="[512,256]")
    parser.add_argument("--top-mlp", default="[1024,1024,512,256]")
    parser.add_argument("--scratch", default="/tmp/terarec-store-large", help="SSD tables and a tiny dataset")
    parser.add_argument("--profile", metavar="DIR", help="profile --profile-steps more steps into DIR")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--no-record", action="store_true", help="do not merge this call's rows into the results")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="every kind at a tiny size on the CPU, results to /tmp")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.dim, args.batch, args.cache_gb, args.host_cache_gb = 26 * 3000, 16, 256, 0.0005, 0.001
        args.zipf, args.warm_batches, args.steps, args.chunk_keys = 1.2, 16, 4, 10_000
        args.bottom_mlp, args.top_mlp, args.kind = "[32]", "[32]", "all"
        args.out = tempfile.mkdtemp(prefix="store-large-smoke-")
    if args.profile:
        mark_calls()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    data = Path(args.scratch) / "data"
    if not (data / "meta.json").exists():  # the worker reads the schema from a dataset; batches come from Keys
        write_synthetic(str(data), rows=2000, seed=0)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    rows = [run_kind(args, kind, str(data), device) for kind in kinds]
    if args.no_record:
        return
    slug = device_name().lower().replace("nvidia ", "").replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
    name = f"store_large-{slug}"
    path = Path(args.out) / f"{name}.json"
    figures = {"rows": merge(path, rows)}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "scratch", "kind")}
    if args.out == RESULTS:
        record(name, figures, settings)
    else:
        os.makedirs(args.out, exist_ok=True)
        path.write_text(json.dumps({"benchmark": name, "device": device_name(), "settings": settings,
                                    "figures": figures}, indent=1))
        print(f"wrote {path}")
    print("| kind | table GB | GPU cache GB | host cache GB | GPU-cache hit | samples/s | vs device |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in figures["rows"]:
        vs = f"{r['vs_device']:.0%}" if r["vs_device"] else "-"
        print(f"| {r['kind']}{' (' + r['ssd_io'] + ')' if 'ssd_io' in r else ''} | {r['table_gb']} | {r['cache_gb']} | {r['host_cache_gb']} | {r['gpu_hit']:.1%} | "
              f"{r['samples_per_s']:,} | {vs} |")


if __name__ == "__main__":
    main()
