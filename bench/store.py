"""Benchmark of the store options (device, cached_host, cached_ssd) and their ceilings, then DLRM on each.

Prints a table, writes JSON to <out>/store-<device>.json and a markdown table to <out>/store.md.

    python bench/store.py --out bench/results            # on a GPU machine
    python bench/store.py --quick --out /tmp/bench        # a small dry run (CPU works)
    python bench/store.py --parity                        # the device store's DLRM against bench/kernels.py's step

Why the device-store DLRM once ran ~20x below the step bench (bench/README.md, "Tiered store"): its figures
were taken before the Triton embedding path existed (commits 642573d, 171425d: torch probing, torch update),
and the later one (store_dlrm_zipf.json: device 0.90M samples/s, slower than cached_host's 1.89M) timed Triton
compiles: fresh Zipf batches have a new unique-key count each step, Triton specializes integer arguments on
divisibility by 16, so a kernel variant first met in the timed window compiled there; the device store ran
first and paid for it. The shapes differed too (batch 16384, a small MLP, TF32 off, the table growing while
timed). Now every DLRM run uses the step bench's model and batch, TF32, a pre-sized device store, and compiles
every kernel variant before timing (`compile_variants`); `--parity` runs both benches on the same inputs.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from results import commit, record
from timing import median_ms
from terarec.models import DLRM, Batch, DLRMConfig, Embedding, SparseDenseOptimizer
from terarec.store import DeviceStore, SparseAdagrad, SparseSGD, feature_keys, make_store
from terarec.store.cache import METADATA_BYTES_PER_SLOT

DIM = 128
OPTIMIZER = SparseAdagrad(lr=0.01)  # value = row + accumulator: 256 floats, 1 KiB per key
WIDTH = DIM * 2
ROW_BYTES = WIDTH * 4
STEP_BATCH = 65536  # the shapes of bench/kernels.py's DLRM step (Criteo, bench/README.md "GPU embedding path")
STEP_MODEL = DLRMConfig(bottom_mlp=[512, 256], top_mlp=[1024, 1024, 512, 256])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- ceilings -------------------------------------------------------------------------------------------

def ceilings(device: torch.device, rows: int, gather: int) -> dict:
    out = {}
    table = torch.randn(rows, WIDTH, device=device)
    index = torch.randint(0, rows, (gather,), device=device)
    seconds = median_ms(lambda: table.index_select(0, index), iters=10, device=device) / 1e3
    out["gather_GBps"] = 2 * gather * ROW_BYTES / seconds / 1e9  # read + write
    out["gather_Mrows_s"] = gather / seconds / 1e6
    del table
    if device.type == "cuda":
        host = torch.empty(rows, WIDTH, pin_memory=True).normal_()
        chunk = host[: min(rows, (256 << 20) // ROW_BYTES)]
        seconds = median_ms(lambda: chunk.to(device, non_blocking=True), iters=10, device=device) / 1e3
        out["h2d_GBps"] = chunk.numel() * 4 / seconds / 1e9
        try:
            from terarec.store.host import HostTable
            mapped = HostTable(WIDTH, device=device, mode="uva")
            mapped.reserve(rows)
            mapped.values.copy_(host)
            seconds = median_ms(lambda: mapped.read(index), iters=10, device=device) / 1e3
            out["uva_gather_GBps"] = gather * ROW_BYTES / seconds / 1e9
            out["uva_gather_Mrows_s"] = gather / seconds / 1e6
            assert torch.equal(mapped.read(index[:1000]).cpu(), host[index[:1000].cpu()])
            del mapped
        except Exception as error:  # reported, not fatal: the copy path still runs
            out["uva_error"] = repr(error)
        del host
    return out


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages (works without root for clean pages)."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def disk_speed(directory: Path, nbytes: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "speed.bin"
    block = np.random.default_rng(0).bytes(64 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    out = {"write_GBps": nbytes / (time.perf_counter() - start) / 1e9}
    drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    start = time.perf_counter()
    while os.read(fd, 8 << 20):
        pass
    out["seq_read_GBps"] = nbytes / (time.perf_counter() - start) / 1e9
    os.close(fd)
    drop_from_page_cache(path)
    rng = np.random.default_rng(1)

    def random_reads(offsets, counter, index):
        fd = os.open(path, os.O_RDONLY)
        for offset in offsets:
            os.pread(fd, 4096, int(offset))
        counter[index] = len(offsets)
        os.close(fd)

    for threads in (1, 16):
        offsets = rng.integers(0, nbytes // 4096, (threads, 4000)) * 4096
        counts = [0] * threads
        workers = [threading.Thread(target=random_reads, args=(offsets[t], counts, t)) for t in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        iops = sum(counts) / (time.perf_counter() - start)
        out[f"rand4k_{threads}thr_kiops"] = iops / 1e3
        out[f"rand4k_{threads}thr_GBps"] = iops * 4096 / 1e9
        drop_from_page_cache(path)
    path.unlink()
    return out


# -- store throughput at a set hit rate --------------------------------------------------------------

def build(kind: str, device: torch.device, cache_rows: int, host_rows: int, path: Path, mode: str | None = None,
          expected_rows: int = 1024):
    """A store; the device store is sized for `expected_rows` so that it does not grow while timed."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if path.exists():
        shutil.rmtree(path)
    if kind == "device":
        return DeviceStore(DIM, OPTIMIZER, device=device, initial_capacity=expected_rows)
    store = make_store(kind, DIM, OPTIMIZER, device=device, cache_bytes=cache_rows * (ROW_BYTES + METADATA_BYTES_PER_SLOT),
                       host_bytes=host_rows * (ROW_BYTES + METADATA_BYTES_PER_SLOT) if host_rows else None,
                       path=str(path))
    if mode is not None:
        store.table.mode = mode
    return store


def store_throughput(store, device: torch.device, universe: int, batch: int, steps: int, cold_path: Path | None) -> dict:
    """Fill `universe` keys, then uniform random unique batches: LRU hit rate ~ cache rows / universe."""
    keys = torch.arange(universe, device=device)
    grads = torch.randn(batch, DIM, device=device) * 1e-3
    for start in range(0, universe, batch):
        store.lookup(keys[start:start + batch])
    batches = [keys[torch.randperm(universe, device=device)[:batch]] for _ in range(steps + 2)]
    for b in batches[:2]:  # steady state
        store.update(store.lookup_for_update(b), grads)
    if cold_path is not None:
        store.flush()
        for chunk in cold_path.glob("chunk-*"):
            drop_from_page_cache(chunk)
    before = store.metrics()
    sync(device)
    start = time.perf_counter()
    for b in batches[2:]:
        store.update(store.lookup_for_update(b), grads)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    after = store.metrics()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    looked = delta.get("cache_hits", 0.0) + delta.get("cache_misses", 0.0)
    moved = sum(v for k, v in delta.items() if k.endswith(("bytes_in", "bytes_out")))
    out = {"step_ms": seconds * 1e3, "Mrows_s": batch / seconds / 1e6,
           "GBps": 2 * batch * ROW_BYTES / seconds / 1e9,  # rows (with state) read and written per step
           "hit_rate": delta["cache_hits"] / looked if looked else 1.0,  # the device store always hits
           "lower_GBps": moved / steps / seconds / 1e9,
           "index_bytes_per_row": after.get("index_bytes_per_row", 0.0)}
    if "host_cache_hits" in delta:
        host_looked = delta["host_cache_hits"] + delta["host_cache_misses"]
        out["host_cache_hit_rate"] = delta["host_cache_hits"] / host_looked if host_looked else 1.0
    return out


# -- DLRM -----------------------------------------------------------------------------------------------

class ZipfIds:
    """Fresh batches of 26 sparse features, each ID of rank r in [0, vocab) drawn with probability
    ~ 1 / (r + 1)^exponent, independently per sample and feature (so new tail IDs keep arriving)."""

    def __init__(self, vocab: int, exponent: float, device: torch.device, seed: int = 0):
        weights = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent
        self.p = weights / weights.sum()
        self.cdf = torch.from_numpy(np.cumsum(self.p)).to(device)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.device = device

    def batch(self, size: int) -> Batch:
        u = torch.rand((size, 26), generator=self.generator, device=self.device, dtype=torch.float64)
        sparse = torch.searchsorted(self.cdf, u * self.cdf[-1]).clamp_(max=self.cdf.numel() - 1)
        dense = torch.randn((size, 13), generator=self.generator, device=self.device)
        labels = torch.randint(0, 2, (size, 1), generator=self.generator, device=self.device).float()
        return Batch(dense, sparse, labels)

    def lru_plan(self, batch: int, hit: float) -> tuple[int, float]:
        """(cache rows, characteristic time in batches) for an LRU hit rate of `hit` over the unique keys
        of each batch, by Che's approximation: a key is cached iff it was used in the last T batches."""
        q = -np.expm1(batch * np.log1p(-self.p))  # chance an ID appears in a batch

        def cached(t: float) -> np.ndarray:  # chance an ID appeared in the last t batches
            return -np.expm1(t * np.log1p(-np.minimum(q, 1 - 1e-16)))

        low, high = 1e-3, 1e8
        for _ in range(100):
            t = (low * high) ** 0.5
            low, high = (t, high) if (q * cached(t)).sum() / q.sum() < hit else (low, t)
        return int(26 * cached(high).sum()), high


class UniformIds:
    """bench/kernels.py's inputs: IDs uniform over [0, vocab) per feature, a fixed set of `pool` batches in turn."""

    def __init__(self, vocab: int, device: torch.device, pool: int = 4, seed: int = 0):
        self.vocab, self.device, self.pool = vocab, device, pool
        self.generator = torch.Generator(device).manual_seed(seed)
        self.made: list[Batch] = []
        self.served = 0

    def batch(self, size: int) -> Batch:
        if len(self.made) < self.pool:
            g, d = self.generator, self.device
            self.made.append(Batch(torch.randn(size, 13, generator=g, device=d),
                                   torch.randint(0, self.vocab, (size, 26), generator=g, device=d),
                                   torch.randint(0, 2, (size, 1), generator=g, device=d).float()))
        self.served += 1
        return self.made[(self.served - 1) % self.pool]


def compile_variants(store, keys: torch.Tensor) -> None:
    """Run lookup + update on 16·k and 16·k + 1 of `keys` (known keys, zero gradients), so that every Triton
    specialization of the store's kernels (integer sizes divisible by 16 or not) compiles before timing."""
    size = (keys.numel() - 1) // 16 * 16
    for part in (keys[:size], keys[: size + 1]):
        store.update(store.lookup_for_update(part), torch.zeros(part.numel(), store.dim, device=part.device))


def dlrm_run(store, device: torch.device, ids, batch: int, warm_batches: int, steps: int,
             dense_optimizer=torch.optim.Adam, dense_lr: float = 1e-3) -> dict:
    """Warm the store with the unique keys of `warm_batches` batches of `ids` (8 batches a lookup, oldest
    first), compile every kernel variant, train 5 steps, then time `steps` training steps.

    The model is bench/kernels.py's DLRM (STEP_MODEL). Each step is timed by CUDA events where there is a
    GPU: `step_ms` is the median (what the step bench reports), `samples_s` counts the whole timed span."""
    model = DLRM(Embedding(store), num_dense=13, num_sparse=26, config=STEP_MODEL).to(device)
    optimizer = SparseDenseOptimizer(model, dense_optimizer(model.parameters(), lr=dense_lr))
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(b: Batch) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(b), b.labels)
        loss.backward()
        optimizer.step()
        return loss

    for start in range(0, warm_batches, 8):
        sparse = torch.cat([ids.batch(batch).sparse for _ in range(min(8, warm_batches - start))])
        warm_keys = torch.unique(feature_keys(sparse))
        store.lookup(warm_keys)
    compile_variants(store, warm_keys)
    for _ in range(5):
        step(ids.batch(batch))
    timed_batches = [ids.batch(batch) for _ in range(steps)]
    before = store.metrics()
    step_ms = []
    sync(device)
    start = time.perf_counter()
    for b in timed_batches:
        begun = time.perf_counter()
        if device.type == "cuda":
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        loss = step(b)
        if device.type == "cuda":
            events[1].record()
            events[1].synchronize()
            step_ms.append(events[0].elapsed_time(events[1]))
        else:
            step_ms.append((time.perf_counter() - begun) * 1e3)
    sync(device)
    seconds = time.perf_counter() - start
    after = store.metrics()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    out = {"samples_s": steps * batch / seconds, "step_ms": float(np.median(step_ms)),
           "mean_step_ms": seconds / steps * 1e3, "loss": float(loss.detach()),
           "rows": after["rows"], "table_GB": after["rows"] * store.value_width * 4 / 1e9}
    for tier in ("cache", "host_cache"):
        if f"{tier}_hits" in delta:
            looked = delta[f"{tier}_hits"] + delta[f"{tier}_misses"]
            out[f"{tier}_hit_rate"] = delta[f"{tier}_hits"] / looked if looked else 1.0
            out[f"{tier}_capacity_rows"] = after[f"{tier}_capacity_rows"]
    if "index_bytes_per_row" in after:
        out["index_bytes_per_row"] = after["index_bytes_per_row"]
    return out


def parity(device: torch.device, batch: int, steps: int) -> dict:
    """The device store's DLRM here and bench/kernels.py's step, on the same shapes and inputs (uniform IDs over
    40000 per feature, 4 batches in turn, SGD on both sides): the two samples/s should agree."""
    from kernels import bench_dlrm_step  # bench/kernels.py

    store = DeviceStore(DIM, SparseSGD(lr=0.01), device=device, initial_capacity=1 << 21)
    here = dlrm_run(store, device, UniformIds(40_000, device), batch, warm_batches=4, steps=steps,
                    dense_optimizer=torch.optim.SGD, dense_lr=0.01)
    step = bench_dlrm_step(batch, steps)
    return {"batch": batch, "store_bench_step_ms": here["step_ms"], "store_bench_samples_s": batch / here["step_ms"] * 1e3,
            "step_bench_fused_ms": step["fused_ms"], "step_bench_samples_s": step["samples_per_s_fused"],
            "ratio": step["fused_ms"] / here["step_ms"]}


# -- main -----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--scratch", default="/tmp/terarec-bench", help="directory for SSD tables (on the disk)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a dry run")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--dlrm-only", action="store_true", help="only the DLRM runs")
    parser.add_argument("--dlrm-hits", default="0.5,0.9,0.99", help="target GPU-cache hit rates, comma-separated")
    parser.add_argument("--dlrm-options", default="device,cached_host,cached_ssd+host",
                        help=f"comma-separated, of {', '.join(DLRM_OPTIONS)}")
    parser.add_argument("--zipf", type=float, default=1.05, help="exponent of the DLRM ID distribution")
    parser.add_argument("--dlrm-batch", type=int, default=STEP_BATCH, help="DLRM batch (the step bench's by default)")
    parser.add_argument("--tag", default="", help="suffix of the recorded result's name")
    parser.add_argument("--parity", action="store_true", help="only the device store's DLRM against the step bench")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the step bench
    if args.parity:
        figures = parity(device, args.dlrm_batch, 4 if args.quick else 20)
        record(f"store_parity{args.tag}", figures, {"dim": DIM, "model": STEP_MODEL.model_dump()})
        print(_fmt(figures))
        return
    scratch = Path(args.scratch)
    q = args.quick
    cache_rows = 1 << (14 if q else 21)  # 2 GiB of rows on the GPU
    batch = 1 << (11 if q else 17)
    steps = 4 if q else 12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "date": datetime.date.today().isoformat(), "commit": args.commit or commit(),
              "torch": torch.__version__, "dim": DIM, "optimizer": "adagrad", "row_bytes": ROW_BYTES,
              "cache_rows": cache_rows, "batch_unique_keys": batch}
    t0 = time.perf_counter()
    if args.dlrm_only:
        dlrm = dlrm_sweep(args, device, scratch, t0)
        shutil.rmtree(scratch, ignore_errors=True)
        record(f"store_dlrm_zipf{args.tag}", dlrm, {"dim": DIM, "optimizer": "adagrad", "row_bytes": ROW_BYTES})
        print("\n".join(dlrm_table(dlrm)))
        return
    result["ceilings"] = ceilings(device, 2 * cache_rows, batch)
    result["disk"] = disk_speed(scratch, (64 if q else 2048) << 20)
    print(f"ceilings {result['ceilings']}\ndisk {result['disk']}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    options = [("device", "device", None, 0), ("cached_host", "cached_host", "copy", 0)]
    if device.type == "cuda" and "uva_error" not in result["ceilings"]:
        options.append(("cached_host", "cached_host", "uva", 0))
    options += [("cached_ssd", "cached_ssd", None, 0), ("cached_ssd+host", "cached_ssd", None, cache_rows)]
    rows = []
    for hit in (0.5, 0.9, 0.99):
        universe = int(cache_rows / hit)
        for label, kind, mode, host_rows in options:
            if kind == "device" and hit != 0.5:
                continue
            store = build(kind, device, cache_rows, host_rows, scratch / "table", mode)
            figures = store_throughput(store, device, universe, batch, steps, None)
            rows.append({"option": label + (f" ({mode})" if mode else ""), "target_hit": hit, **figures})
            print(_fmt(rows[-1]), f"({time.perf_counter() - t0:.0f}s)", flush=True)
            del store
    store = build("cached_ssd", device, cache_rows, 0, scratch / "table")
    figures = store_throughput(store, device, int(cache_rows / 0.5), batch, steps, scratch / "table")
    rows.append({"option": "cached_ssd, cold page cache", "target_hit": 0.5, **figures})
    print(_fmt(rows[-1]), flush=True)
    start = time.perf_counter()
    store.flush()
    result["ssd_snapshot_s"] = time.perf_counter() - start
    del store
    result["store"] = rows

    result["dlrm"] = dlrm_sweep(args, device, scratch, t0)
    shutil.rmtree(scratch, ignore_errors=True)
    write(result, Path(args.out))


DLRM_OPTIONS = {"device": ("device", 0), "cached_host": ("cached_host", 0),
                "cached_ssd+host": ("cached_ssd", 4), "cached_ssd": ("cached_ssd", 0)}  # kind, host cache 1/n of IDs


def dlrm_sweep(args, device: torch.device, scratch: Path, t0: float) -> dict:
    """DLRM on fresh Zipf batches: for each target hit rate, a GPU cache sized for it (Che's approximation),
    every option warmed on the same key history, then timed; `device` once, warmed for the largest target."""
    q = args.quick
    vocab, batch, steps = (1 << 12, 1024, 4) if q else (1 << 18, args.dlrm_batch, 20)
    hits = [float(h) for h in args.dlrm_hits.split(",")]
    options = args.dlrm_options.split(",")
    runs = []
    for hit in sorted(hits, reverse=True):
        cache_rows, horizon = ZipfIds(vocab, args.zipf, device).lru_plan(batch, hit)
        warm = int(1.5 * horizon) + 8
        for label in options:
            if label == "device" and hit != max(hits):
                continue
            kind, host_share = DLRM_OPTIONS[label]
            host_rows = 26 * vocab // host_share if host_share else 0
            store = build(kind, device, cache_rows, host_rows, scratch / "dlrm", expected_rows=26 * vocab)
            ids = ZipfIds(vocab, args.zipf, device, seed=1)  # the same batches for every option
            runs.append({"option": label, "target_hit": hit, "warm_batches": warm, "cache_rows": cache_rows,
                         **dlrm_run(store, device, ids, batch, warm, steps)})
            print(_fmt(runs[-1]), f"({time.perf_counter() - t0:.0f}s)", flush=True)
            del store
    return {"batch": batch, "vocab_per_feature": vocab, "zipf_exponent": args.zipf, "timed_steps": steps,
            "runs": runs}


def dlrm_table(m: dict) -> list[str]:
    lines = [f"DLRM, batch {m['batch']}, 26 features of fresh Zipf({m['zipf_exponent']}) IDs over {m['vocab_per_feature']} "
             f"per feature, {m['timed_steps']} steps timed after the warm-up; GPU cache sized for the target "
             "hit rate (Che's approximation), hit rates measured over the unique keys of each timed batch; "
             "cached_ssd+host has a host cache of a quarter of the ID universe.", "",
             "| option | target hit | GPU cache rows | table rows | samples/s | vs device | GPU-cache hit | host-cache hit | index bytes/row |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = next((r["samples_s"] for r in m["runs"] if r["option"] == "device"), None)
    for r in m["runs"]:
        lines.append(f"| {r['option']} | {r['target_hit']:.0%} | {r['cache_rows'] if r['option'] != 'device' else '-'} | "
                     f"{r['rows']:.0f} | {r['samples_s']:,.0f} | " + (f"{r['samples_s'] / base:.0%}" if base else "-")
                     + f" | {r.get('cache_hit_rate', 1.0):.1%} | "
                     + (f"{r['host_cache_hit_rate']:.1%}" if "host_cache_hit_rate" in r else "-")
                     + f" | {r.get('index_bytes_per_row', 0.0):.0f} |")
    return lines


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].lower().replace(" ", "-")
    (out / f"store-{slug}.json").write_text(json.dumps(result, indent=1))
    c = result["ceilings"]
    lines = [f"### Store options on {result['device']} ({result['date']}, commit {str(result['commit'])[:9]})", "",
             f"dim {DIM}, Adagrad (1 KiB per key with state), cache {result['cache_rows']} rows, "
             f"{result['batch_unique_keys']} unique keys per step, lookup + update, uniform keys.", "",
             "| option | target hit | measured hit | Mrows/s | GB/s (rows r+w) | lower-tier GB/s | ms/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["store"]:
        lines.append(f"| {r['option']} | {r['target_hit']:.0%} | {r['hit_rate']:.1%} | {r['Mrows_s']:.1f} | "
                     f"{r['GBps']:.1f} | {r['lower_GBps']:.2f} | {r['step_ms']:.2f} |")
    d = result["disk"]
    lines += ["", "Ceilings measured in the same run: "
              f"index_select gather {c['gather_GBps']:.0f} GB/s ({c['gather_Mrows_s']:.0f} M rows/s); "
              + (f"zero-copy (UVA) host gather {c['uva_gather_GBps']:.1f} GB/s ({c['uva_gather_Mrows_s']:.1f} M rows/s); "
                 if "uva_gather_GBps" in c else "")
              + (f"pinned H2D copy {c['h2d_GBps']:.1f} GB/s; " if "h2d_GBps" in c else "")
              + f"disk sequential read {d['seq_read_GBps']:.2f} GB/s, write {d['write_GBps']:.2f} GB/s, random 4 KiB "
              f"reads {d['rand4k_1thr_kiops']:.1f} k IOPS (1 thread) / {d['rand4k_16thr_kiops']:.1f} k IOPS (16 threads). "
              f"SSD snapshot (flush + commit) {result['ssd_snapshot_s']:.2f} s.", ""]
    lines += dlrm_table(result["dlrm"])
    (out / "store.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
