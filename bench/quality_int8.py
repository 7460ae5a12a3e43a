"""DLRM quality with a quantized embedding exchange: AUC of int8 (rows and gradients) vs fp32 at equal steps.

Each run is a real Ray Train job of `--workers` CPU workers (gloo) on the same
synthetic data, seed and steps; only the wire formats differ. For scale, the
AUC spread of fp32 itself over the seeds is printed beside the int8 - fp32
differences. Prints a table and writes bench/results/quality_int8.json.

    python bench/quality_int8.py [--rows 600000] [--steps 250] [--batch-size 2048] [--seeds 0 1] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile

from terarec.core.config import load_config
from terarec.core.data.synth import write_synthetic
from terarec.platform.runner import run_training

from results import record  # bench/results.py

WIRES = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "int8": ("int8", "int8"), "int8-rows": ("int8", "fp32")}


def train(data: str, run_dir: str, args, seed: int, wire: str) -> dict:
    rows_format, grads_format = WIRES[wire]
    settings = {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "steps": args.steps,
                "batch_size": args.batch_size, "seed": seed, "embedding.dim": args.dim, "log_every": args.steps,
                "embedding.comm_dtype": rows_format, "embedding.grad_comm_dtype": grads_format}
    config = load_config(overrides=[f"{key}={value}" for key, value in settings.items()],
                         flags={"data": data, "run_dir": run_dir})
    return run_training(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=600_000)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--wires", nargs="+", default=["fp32", "int8"], choices=list(WIRES))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        data = os.path.join(scratch, "data")
        write_synthetic(data, rows=args.rows, seed=0)
        for seed in args.seeds:
            for wire in args.wires:
                metrics = train(data, os.path.join(scratch, f"{wire}-{seed}"), args, seed, wire)
                runs.append({"seed": seed, "wire": wire, "auc": metrics["auc"], "logloss": metrics["logloss"],
                             "steps": metrics["steps"], "samples_per_s": metrics["samples_per_s"]})
                print(f"seed {seed} {wire}: AUC {metrics['auc']:.5f} logloss {metrics['logloss']:.5f}", flush=True)
    auc = {(run["seed"], run["wire"]): run["auc"] for run in runs}
    fp32 = [auc[seed, "fp32"] for seed in args.seeds]
    gaps = {wire: [auc[seed, wire] - auc[seed, "fp32"] for seed in args.seeds] for wire in args.wires if wire != "fp32"}
    print(f"\nDLRM, {args.workers} CPU workers (gloo), {args.steps} steps x {args.batch_size}, synthetic data")
    print("| seed | " + " | ".join(f"AUC {wire}" for wire in args.wires) + " | " +
          " | ".join(f"{wire} - fp32" for wire in gaps) + " |")
    print("| --- " * (1 + len(args.wires) + len(gaps)) + "|")
    for i, seed in enumerate(args.seeds):
        print(f"| {seed} | " + " | ".join(f"{auc[seed, wire]:.5f}" for wire in args.wires) + " | " +
              " | ".join(f"{gap[i]:+.5f}" for gap in gaps.values()) + " |")
    spread = max(fp32) - min(fp32)
    print(f"fp32 AUC spread over seeds: {spread:.5f}")
    record("quality_int8", {"runs": runs, "auc_gap_vs_fp32": gaps, "fp32_auc_spread_over_seeds": spread}, vars(args))


if __name__ == "__main__":
    main()
