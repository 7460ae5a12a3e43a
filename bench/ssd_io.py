"""The SSD table's row I/O, its three ways (store/ssd.py `io`): one range of maps (`map`), a map per chunk
(`chunk-maps`, the way `map` worked before) and positional calls (`pread`).

Rows of 1 KiB (dim 128 with Adagrad state) in an SsdTable of --rows rows; random unique slots in batches of the
sizes a training step reads and writes (--batches; 11264 is about the misses of one step of the 40 GB table on
the H200, bench/README.md). Each batch is moved every way from the same files: read with the page cache warm
(the rows read once before, the maps made afresh) and cold (the table's pages dropped before each batch), read
warm while another thread runs Python (a training loop holds the GIL between its ops: `pread` needs the GIL back
after every call, `chunk-maps` once per touched chunk, `map` once per I/O thread), and written (into the page
cache; the kernel writes the pages back later either way). Two cases turn it round: the main thread runs small
torch ops (as a training loop launches kernels) while a side thread reads or writes the batches, and the figure
is the main thread's time lost per batch moved beside it (`main_ms_lost`, CPU share included, which other
processes on a shared machine swamp) and the part of it spent blocked, neither running nor waiting for a CPU:
waiting for the GIL (`main_ms_blocked`, from Linux's schedstat: robust to load). `ms` is still the side's time
per batch and `side_cpu_ms` the CPU time of every thread but the main one. --chunk-rows below the store's 65536 gives a table of a few GB as many chunks
as the 40 GB one has. Prints a table; JSON to bench/results/ssd_io-<device>.json.

    python bench/ssd_io.py --scratch /tmp/terarec-ssd-io          # a directory on the disk to measure
    python bench/ssd_io.py --rows 200000 --repeats 3 --out /tmp   # a quick look
    python bench/ssd_io.py --rows 4000000 --chunk-rows 4096 --batches 11264,200000 --repeats 4   # bench/README.md's
"""
from __future__ import annotations

import argparse
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from results import RESULTS, device_name, record  # bench/results.py
from store import drop_from_page_cache  # bench/store.py
from terarec.store.ssd import IO_MODES, READERS, SsdTable

WIDTH = 256  # dim 128 + Adagrad's accumulator
ROW_BYTES = WIDTH * 4
CASES = ("read, page cache warm", "read, page cache cold", "read warm, Python busy beside", "write",
         "read warm beside the main thread", "write beside the main thread")
BESIDE = ("read warm beside the main thread", "write beside the main thread")


class BusyPython:
    """A thread running pure Python (holding the GIL but for the interpreter's switches) while in `with`."""

    def __enter__(self):
        self.running = True
        self.thread = threading.Thread(target=self._spin)
        self.thread.start()

    def _spin(self) -> None:
        total = 0
        while self.running:
            for i in range(1000):
                total += i

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def small_ops(until) -> tuple[int, float]:
    """Tiny in-place torch ops (a few microseconds each, mostly dispatch under the GIL, like a training loop's
    launches) until `until()`, checked every 100; returns (ops, seconds)."""
    x = torch.zeros(64)
    ops, started = 0, time.perf_counter()
    while not until():
        for _ in range(100):
            x.add_(1.0)
        ops += 100
    return ops, time.perf_counter() - started


def cpu_seconds() -> float:
    """CPU time of the whole process (every thread), user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def on_cpu_or_queued() -> float:
    """Seconds the calling thread has run (its CPU clock) or waited for a CPU (Linux schedstat); the rest of
    its time it was blocked: a thread that runs Python without I/O blocks only on the GIL."""
    return time.thread_time() + int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


def main_thread_loss(table: SsdTable, case: str, slots: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """Per batch: (the side thread's seconds, the CPU seconds of every thread but the main one, the main thread's
    seconds lost, of which blocked on the GIL). The main thread's ops rate is measured alone (before and after)
    and while a side thread moves the batches; lost = time beside - ops done beside / rate alone, which counts
    CPU share too (the I/O threads' and other processes'); blocked = time beside neither running nor waiting
    for a CPU."""
    table.read(torch.cat(slots))
    table.io = table.io
    values = [torch.randn(batch.numel(), WIDTH) for batch in slots]

    def ops_per_s_alone() -> float:
        deadline = time.perf_counter() + 0.25
        ops, seconds = small_ops(lambda: time.perf_counter() > deadline)
        return ops / seconds

    before = ops_per_s_alone()
    done = threading.Event()
    side_s = []

    def move() -> None:
        started = time.perf_counter()
        for batch, rows in zip(slots, values):
            if case == "write beside the main thread":
                table.write(batch, rows)
                table.wait_for_writes()
            else:
                table.read(batch)
        side_s.append(time.perf_counter() - started)
        done.set()

    side = threading.Thread(target=move)
    cpu, main_cpu, scheduled, started = cpu_seconds(), time.thread_time(), on_cpu_or_queued(), time.perf_counter()
    side.start()
    ops, seconds = small_ops(done.is_set)
    blocked = time.perf_counter() - started - (on_cpu_or_queued() - scheduled)
    others_cpu = cpu_seconds() - cpu - (time.thread_time() - main_cpu)
    side.join()
    rate_alone = (before + ops_per_s_alone()) / 2
    return (side_s[0] / len(slots), others_cpu / len(slots), (seconds - ops / rate_alone) / len(slots),
            blocked / len(slots))


def seconds_per_batch(table: SsdTable, case: str, slots: list[torch.Tensor], files: list[Path]) -> float:
    total = 0.0
    if case != "read, page cache cold":
        table.read(torch.cat(slots))  # every row of these batches in the page cache
        table.io = table.io  # but no page mapped: a big table's misses are mostly rows its maps never touched
    for batch in slots:
        if case == "read, page cache cold":
            table.io = table.io  # lets go of the maps: mapped pages do not leave the page cache
            for file in files:
                drop_from_page_cache(file)
        started = time.perf_counter()
        if case == "write":
            table.write(batch, torch.randn(batch.numel(), WIDTH))
            table.wait_for_writes()
        elif case == "read warm, Python busy beside":
            with BusyPython():
                started = time.perf_counter()
                table.read(batch)
                total += time.perf_counter() - started
            continue
        else:
            table.read(batch)
        total += time.perf_counter() - started
    return total / len(slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="table rows of 1 KiB")
    parser.add_argument("--batches", default="2048,11264,65536", help="rows per read/write, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="batches timed per size, case and way")
    parser.add_argument("--readers", type=int, default=READERS, help="I/O threads")
    parser.add_argument("--chunk-rows", type=int, default=1 << 16,
                        help="rows per chunk file (the store's 65536); fewer: as many chunks as a bigger table has")
    parser.add_argument("--scratch", default="/tmp/terarec-ssd-io")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    table = SsdTable(scratch, WIDTH, {"dim": 128}, readers=args.readers, chunk_rows=args.chunk_rows)
    table.reserve(args.rows)
    block = args.chunk_rows
    for start in range(0, args.rows, block):
        slots = torch.arange(start, min(start + block, args.rows))
        table.write(slots, torch.randn(slots.numel(), WIDTH))
    table.sync()
    files = [Path(file.name) for file in table.chunks]
    rng = np.random.default_rng(0)
    rows = []
    for size in (int(b) for b in args.batches.split(",")):
        for case in CASES:
            slots = [torch.from_numpy(rng.choice(args.rows, size, replace=False)) for _ in range(args.repeats)]
            for io in IO_MODES:  # the same batches every way, one right after the other
                table.io = io
                if case in BESIDE:
                    seconds, side_cpu, lost, blocked = main_thread_loss(table, case, slots)
                else:
                    seconds, lost = seconds_per_batch(table, case, slots, files), None
                rows.append({"io": io, "case": case, "batch_rows": size, "ms": round(seconds * 1e3, 2),
                             "rows_per_s": round(size / seconds), "MB_per_s": round(size * ROW_BYTES / seconds / 1e6, 1)})
                if lost is not None:
                    rows[-1].update(side_cpu_ms=round(side_cpu * 1e3, 2), main_ms_lost=round(lost * 1e3, 2),
                                    main_ms_blocked=round(blocked * 1e3, 2))
                print(rows[-1], flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    settings = {"table_rows": args.rows, "row_bytes": ROW_BYTES, "chunk_rows": args.chunk_rows, "repeats": args.repeats,
                "readers": args.readers,
                "note": "shared machine: timings are noisy; every way on the same batches, one after the other"}
    if args.out == RESULTS:
        slug = device_name().lower().replace("nvidia ", "").split(" (")[0].replace(" ", "-")
        record(f"ssd_io-{slug}", {"rows": rows}, settings)
    print(f"| case | batch rows | {' | '.join(f'{io} rows/s' for io in IO_MODES)} | "
          f"{' | '.join(f'{io}: main thread ms blocked per batch' for io in IO_MODES)} |")
    print(f"| --- | ---: |{' ---: |' * 2 * len(IO_MODES)}")
    for first in (r for r in rows if r["io"] == IO_MODES[0]):
        same = [next(r for r in rows if r["io"] == io and r["case"] == first["case"]
                     and r["batch_rows"] == first["batch_rows"]) for io in IO_MODES]
        rates = " | ".join(f"{r['rows_per_s']:,}" for r in same)
        lost = " | ".join(str(r.get("main_ms_blocked", "-")) for r in same)
        print(f"| {first['case']} | {first['batch_rows']} | {rates} | {lost} |")


if __name__ == "__main__":
    main()
