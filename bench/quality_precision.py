"""DLRM quality by `precision`: AUC of bf16 (and tf32) against fp32 on the quickstart data and settings.

Each run is `terarec train`'s job (a real Ray Train job, on the GPU when there is one) on the data of
scripts/quickstart.sh (1M synthetic rows, seed 0), 800 steps x 2048; only `precision` differs. The goal
(issue 18): |AUC bf16 - AUC fp32| < 0.001. Writes bench/results/quality_precision.json.

    python bench/quality_precision.py [--data data/quickstart] [--precisions fp32 tf32 bf16] [--seeds 0]
"""
from __future__ import annotations

import argparse
import os
import tempfile

from terarec.core.config import load_config
from terarec.core.data.synth import write_synthetic
from terarec.platform.runner import run_training

from results import record  # bench/results.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/quickstart", help="written like scripts/quickstart.sh if absent")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16"])
    args = parser.parse_args()
    if "fp32" not in args.precisions:
        parser.error("--precisions must include fp32, the baseline the others are compared with")
    if not os.path.isfile(os.path.join(args.data, "meta.json")):
        write_synthetic(args.data, rows=args.rows, seed=0)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for precision in args.precisions:
                config = load_config(overrides=[f"precision={precision}"], flags={
                    "data": args.data, "model": "dlrm", "steps": args.steps, "batch_size": args.batch_size,
                    "seed": seed, "run_dir": os.path.join(scratch, f"{precision}-{seed}")})
                metrics = run_training(config)
                runs.append({"seed": seed, "precision": precision, "auc": metrics["auc"],
                             "logloss": metrics["logloss"], "samples_per_s": metrics["samples_per_s"]})
                print(f"seed {seed} {precision}: AUC {metrics['auc']:.5f} logloss {metrics['logloss']:.5f} "
                      f"{metrics['samples_per_s']:,.0f} samples/s", flush=True)
    auc = {(run["seed"], run["precision"]): run["auc"] for run in runs}
    gaps = {p: [auc[seed, p] - auc[seed, "fp32"] for seed in args.seeds] for p in args.precisions if p != "fp32"}
    for precision, gap in gaps.items():
        print(f"{precision} - fp32 AUC: {', '.join(f'{g:+.5f}' for g in gap)} (goal: within 0.001)")
    record("quality_precision", {"runs": runs, "auc_gap_vs_fp32": gaps}, vars(args))


if __name__ == "__main__":
    main()
