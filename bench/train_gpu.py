"""DLRM training on one GPU, stage by stage and end to end, per precision, with the plain PyTorch recipe beside it.

One run: make the data (`terarec data synth`, 0.1 x Criteo Kaggle's cardinalities), then
(a) the reader alone (column copies -> pinned ring -> GPU; the old parquet path too, for reference),
(b) the training step alone on batches already on the GPU (`TrainWorker.train_step`),
(c) `terarec train` end to end (a fresh process and local Ray each time: steady windows and the time from
    launch to the first step, with Triton's compile cache filled by (b), as on a user's second run),
for each precision; and the baselines at the same shapes and precisions: one nn.EmbeddingBag per feature with
sparse and with dense gradients (Adagrad on the tables, Adam on the dense part, as terarec's step), and
torch.compile of its dense part. Shapes: DLRM embedding.dim=128, bottom_mlp=[512,256],
top_mlp=[1024,1024,512,256], batch 65536, device store, sparse Adagrad.

Writes bench/results/train_gpu-<device>.json after every stage (figures.rows: one row per (what, precision)
with reader_samples_per_s, step_samples_per_s, e2e_samples_per_s, first_step_s) and prints the table.

    python bench/train_gpu.py                          # the GPU run: about 6 minutes on an H200, data included
    python bench/train_gpu.py --precisions fp32,tf32,bf16
    python bench/train_gpu.py --smoke                  # tiny sizes on CPU, the same code path but compile
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from results import device_name, record  # bench/results.py
from train_cpu import PlainDLRM  # bench/train_cpu.py
from terarec.actors.train_worker import TrainWorker
from terarec.core.config import load_config
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.data.synth import write_synthetic
from terarec.kernels.comm import LocalCommunicator
from terarec.kernels.precision import autocast, matmul_precision
from terarec.models import DLRMConfig

FULL = dict(rows=4_000_000, batch_size=65536, dim=128, bottom=[512, 256], top=[1024, 1024, 512, 256],
            cardinality_scale=0.1, reader_batches=200, warmup=10, steps=60, e2e_steps=400, log_every=50,
            eval_rows=131072)
SMOKE = dict(rows=30_000, batch_size=2048, dim=16, bottom=[32, 16], top=[64, 32], cardinality_scale=1e-3,
             reader_batches=20, warmup=2, steps=4, e2e_steps=20, log_every=5, eval_rows=4096)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Give the last stage's model and tables back before the next one allocates its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rate(step, batches: list, warmup: int, steps: int, device: torch.device) -> float:
    """Samples/s of `step` over `steps` calls after `warmup`, cycling through batches already on the device."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    synchronize(device)
    return steps * len(batches[0]) / (time.perf_counter() - started)


def config_overrides(shape: dict, precision: str) -> list[str]:
    overrides = [f"embedding.dim={shape['dim']}", f"dlrm.bottom_mlp={shape['bottom']}", f"dlrm.top_mlp={shape['top']}",
                 "store.kind=device", "embedding.optimizer=adagrad", f"log_every={shape['log_every']}",
                 f"eval_rows={shape['eval_rows']}"]
    return overrides + [f"precision={precision}"]


# ---- (a) the reader ---------------------------------------------------------------------------------------------

def reader_rate(files: list[str], shape: dict, device: torch.device, threads: int, columns: bool, batches: int) -> float:
    with BatchReader(files, shape["batch_size"], device=device, threads=threads, columns=columns) as reader:
        iterator = iter(reader)
        next(iterator)
        synchronize(device)
        started = time.perf_counter()
        rows = sum(len(next(iterator)) for _ in range(batches))
        synchronize(device)
        return rows / (time.perf_counter() - started)


# ---- (b) the step alone -------------------------------------------------------------------------------------------

def preloaded(files: list[str], shape: dict, device: torch.device, count: int) -> list:
    with BatchReader(files, shape["batch_size"], device=device, epochs=None) as reader:
        return [batch for batch, _ in zip(reader, range(count))]


def terarec_step_rate(data: str, shape: dict, precision: str, batches: list, device: torch.device,
                      profile_to: str | None = None, cuda_graphs: bool = True) -> float:
    config = load_config(overrides=config_overrides(shape, precision) + [f"cuda_graphs={str(cuda_graphs).lower()}"],
                         flags={"data": data, "batch_size": shape["batch_size"], "model": "dlrm"})
    worker = TrainWorker(config, LocalCommunicator(), device)
    samples_per_s = rate(worker.train_step, batches, shape["warmup"], shape["steps"], device)
    if profile_to:
        profile_steps(worker.train_step, batches, device, profile_to)
    if cuda_graphs and device.type == "cuda" and not worker._head_graph:
        print(f"warning: {precision}: the step ran without CUDA graphs (capture failed or not possible)")
    return samples_per_s


def profile_steps(step, batches: list, device: torch.device, name: str, steps: int = 5) -> None:
    """Where a warm step's time goes: torch.profiler over `steps` steps, the kernel table (by device time) and
    the host's time per step, to bench/results/<name>; the wall time per step is printed beside the summed
    device time, so a launch-bound step (device idle between kernels) shows as wall >> device."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3 / steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)
    # the device's busy time: the union of its kernels' intervals (the table above counts a Triton kernel
    # under its launching op too); wall - busy is the time the GPU waited for the host
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy_us, reach = 0.0, float("-inf")
    for start, end in spans:
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    text = (f"wall {wall_ms:.2f} ms/step under the profiler, device busy {busy_us / 1e3 / steps:.2f} ms/step "
            f"({steps} steps)\n{table}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    with open(path, "w") as out:
        out.write(text)
    print(text[:6000])


# ---- (c) end to end -----------------------------------------------------------------------------------------------

def end_to_end(data: str, shape: dict, precision: str, run_dir: str) -> dict:
    """`terarec train` in a fresh process: steady samples/s (every window after the first), time to first step."""
    command = [sys.executable, "-m", "terarec.platform.cli", "train", "--model", "dlrm", "--data", data,
               "--run-dir", run_dir, "--steps", str(shape["e2e_steps"]), "--batch-size", str(shape["batch_size"])]
    for override in config_overrides(shape, precision):
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"terarec train failed ({result.returncode}): {result.stderr[-3000:]}")
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    records = [json.loads(line) for line in open(os.path.join(run_dir, "curve.jsonl"))]
    windows = [record for record in records if "samples_per_s" in record]  # the training windows, not the evals
    steady = windows[1:] or windows
    steps = [b["step"] - a["step"] for a, b in zip(windows, windows[1:])] or [windows[0]["step"]]
    seconds = sum(n * shape["batch_size"] / w["samples_per_s"] for n, w in zip(steps, steady))
    return {"e2e_samples_per_s": sum(steps) * shape["batch_size"] / seconds,
            "e2e_first_window_samples_per_s": windows[0]["samples_per_s"],
            "first_step_s": metrics.get("time_to_first_step_s"), "startup_s": metrics.get("startup_s"),
            "e2e_wall_s": metrics.get("wall_s"),
            "auc": metrics.get("auc")}


# ---- baselines: the plain PyTorch recipe ------------------------------------------------------------------------------

def plain_step_rate(table_rows: list[int], shape: dict, precision: str, batches: list, device: torch.device,
                    sparse: bool, compiled: bool) -> float:
    torch.manual_seed(0)
    model = PlainDLRM(table_rows, 26, shape["dim"], DLRMConfig(bottom_mlp=shape["bottom"], top_mlp=shape["top"]),
                      sparse=sparse).to(device)
    if compiled:
        model.dense_part = torch.compile(model.dense_part)
    tables = [p for name, p in model.named_parameters() if name.startswith("tables")]
    dense = [p for name, p in model.named_parameters() if not name.startswith("tables")]
    optimizers = [torch.optim.Adagrad(tables, lr=0.05), torch.optim.Adam(dense, lr=3e-3)]
    loss_fn = nn.BCEWithLogitsLoss()

    def step(batch):  # the precision as terarec's step applies it
        with matmul_precision(precision):
            with autocast(precision, device):
                loss = loss_fn(model(batch).float(), batch.labels)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()

    return rate(step, batches, shape["warmup"], shape["steps"], device)


def print_table(rows: list[dict]) -> None:
    columns = ("what", "precision", "reader_samples_per_s", "step_samples_per_s", "e2e_samples_per_s", "first_step_s")
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        cells = [row.get(column) for column in columns]
        print("| " + " | ".join(f"{c:,.0f}" if isinstance(c, float) and c > 100 else
                                 f"{c:.1f}" if isinstance(c, float) else "—" if c is None else str(c)
                                 for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU), to check the script")
    parser.add_argument("--precisions", default="tf32,bf16", help="comma-separated: fp32, tf32, bf16")
    parser.add_argument("--rows", type=int, help="rows to synthesize (default 4M; smoke 30k)")
    parser.add_argument("--data", help="reuse a data directory instead of synthesizing one")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="reader threads (default: all cores)")
    parser.add_argument("--stages", default="reader,step,e2e,baselines",
                        help="comma-separated subset of reader, step, e2e, baselines (e2e needs step)")
    parser.add_argument("--profile", action="store_true",
                        help="after each step-alone rate, profile 5 steps: kernel table to results/*-profile-*.txt")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline (skipped in --smoke: minutes of CPU compile)")
    parser.add_argument("--tag", help="appended to the results' name, for a partial run kept beside the full one")
    args = parser.parse_args()
    shape = dict(SMOKE if args.smoke else FULL)
    shape["rows"] = args.rows or shape["rows"]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    stages = {s.strip() for s in args.stages.split(",")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = device_name().lower().replace("nvidia ", "").replace(" ", "-") if device.type == "cuda" else "cpu"
    name = f"train_gpu-{slug}" + ("-smoke" if args.smoke else "") + (f"-{args.tag}" if args.tag else "")
    settings = {**shape, "precisions": precisions, "reader_threads": args.threads, "device": str(device)}
    figures: dict = {"rows": [], "stages_s": {}}

    def stage(what: str, started: float) -> None:
        figures["stages_s"][what] = round(time.perf_counter() - started, 1)
        record(name, figures, settings)

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        data = args.data or os.path.join(scratch, "data")
        if not args.data:
            write_synthetic(data, rows=shape["rows"], seed=0, cardinality_scale=shape["cardinality_scale"])
        stage("synth", started)
        train_files = list_split_files(data, "train")
        table_rows = json.load(open(os.path.join(data, "meta.json")))["cardinalities"].values()

        started = time.perf_counter()
        with BatchReader(train_files, shape["batch_size"], threads=args.threads) as reader:
            next(iter(reader))  # builds (or checks) the column copies
        stage("column_copies", started)

        started = time.perf_counter()
        reader = None if "reader" not in stages else reader_rate(train_files, shape, device, args.threads, True, shape["reader_batches"])
        if reader is not None:
            figures["reader_parquet_samples_per_s"] = reader_rate(train_files, shape, device, args.threads, False,
                                                                  max(4, shape["reader_batches"] // 10))
            print(f"reader: columns {reader:,.0f} samples/s, parquet {figures['reader_parquet_samples_per_s']:,.0f}")
            stage("reader", started)

        batches = preloaded(train_files, shape, device, 8)
        for precision in precisions if "step" in stages else []:
            started = time.perf_counter()
            # the step alone first: it fills Triton's on-disk compile cache for this precision, so the end-to-end
            # run's first_step_s is a user's second run (a machine's very first run also pays the cold compiles)
            step_rate = terarec_step_rate(data, shape, precision, batches, device,
                                          profile_to=f"{name}-profile-{precision}.txt" if args.profile else None)
            release(device)
            eager_rate = terarec_step_rate(data, shape, precision, batches, device, cuda_graphs=False)
            release(device)
            row = {"what": "terarec", "precision": precision, "reader_samples_per_s": reader,
                   "step_samples_per_s": step_rate, "step_samples_per_s_without_cuda_graphs": eager_rate}
            if "e2e" in stages:
                row.update(end_to_end(data, shape, precision, os.path.join(scratch, f"run-{precision}")))
                row["e2e_of_step"] = row["e2e_samples_per_s"] / row["step_samples_per_s"]
            release(device)
            figures["rows"].append(row)
            print(row)
            stage(f"terarec {precision}", started)

        baselines = [("pytorch EmbeddingBag, sparse grads", True, False),
                     ("pytorch EmbeddingBag, dense grads", False, False)]
        baselines += [] if args.no_compile or args.smoke else [("pytorch EmbeddingBag, sparse grads, compiled dense part", True, True)]
        for what, sparse, compiled in baselines if "baselines" in stages else []:
            for precision in precisions:
                started = time.perf_counter()
                step = plain_step_rate(list(table_rows), shape, precision, batches, device, sparse, compiled)
                figures["rows"].append({"what": what, "precision": precision, "step_samples_per_s": step})
                release(device)
                stage(f"{what} {precision}", started)
    print_table(figures["rows"])


if __name__ == "__main__":
    main()
