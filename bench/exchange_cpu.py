"""Cost of the embedding exchange on CPU (gloo): bytes per step, exchange time vs the whole step, 1/2/4 workers.

Each worker is a process running the real TrainWorker over a gloo process group, on the same global batches.
Prints a table and writes bench/results/exchange_cpu.json.

    python bench/exchange_cpu.py [--workers 1 2 4] [--steps 30] [--batch-size 4096]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from terarec.actors.train_worker import TrainWorker
from terarec.kernels.comm import GlooCommunicator, LocalCommunicator
from terarec.core.config import load_config
from terarec.core.data.reader import BatchReader
from terarec.core.data.synth import write_synthetic

from results import record  # bench/results.py


def run_worker(rank, world, data, args, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = GlooCommunicator() if world > 1 else LocalCommunicator()
    config = load_config(overrides=[f"embedding.dim={args.dim}", f"embedding.comm_dtype={args.wire}",
                                    f"embedding.grad_comm_dtype={args.wire}"],
                         flags={"data": data, "batch_size": args.batch_size, "steps": args.steps, "workers": world})
    worker = TrainWorker(config, comm, torch.device("cpu"))
    step_seconds = 0.0
    with BatchReader(worker.train_files, args.batch_size, rank=rank, world_size=world, shuffle=False) as reader:
        for index, batch in enumerate(reader):
            if index == 5:  # warm-up done
                worker.rows.stats.bytes_sent, worker.rows.stats.seconds, step_seconds = 0, 0.0, 0.0
            if index == args.steps + 5:
                break
            started = time.perf_counter()
            worker.train_step(batch)
            step_seconds += time.perf_counter() - started
    out[rank] = (worker.rows.stats.bytes_sent / args.steps, worker.rows.stats.seconds / args.steps, step_seconds / args.steps)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--wire", default="fp32")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as data:
        write_synthetic(data, rows=args.batch_size * (args.steps + 8), seed=0, cardinality_scale=1e-3)
        for world in args.workers:
            out = mp.Manager().dict()
            mp.spawn(run_worker, args=(world, data, args, 29600 + world, out), nprocs=world)
            sent = sum(v[0] for v in out.values())
            exchange = max(v[1] for v in out.values())
            step = max(v[2] for v in out.values())
            rows.append({"workers": world, "mb_sent_per_step": sent / 1e6, "exchange_ms": exchange * 1e3,
                         "step_ms": step * 1e3, "exchange_share": exchange / step,
                         "samples_per_s": args.batch_size / step})
    print("\n| workers | MB sent/step (all workers) | exchange ms/step | step ms | exchange share | samples/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['workers']} | {row['mb_sent_per_step']:.2f} | {row['exchange_ms']:.1f} | {row['step_ms']:.1f} | "
              f"{row['exchange_share']:.0%} | {row['samples_per_s']:,.0f} |")
    record("exchange_cpu", {"rows": rows}, vars(args))


if __name__ == "__main__":
    main()
