"""`terarec data synth` and `terarec data convert`: make a terarec data directory.

Mount with `register(data_parser.add_subparsers(...))`; each subcommand sets `func(args) -> int`. Bad input
raises `DataError`, which the main CLI reports in one line.
"""
from __future__ import annotations

import argparse

from terarec.core.data.criteo import convert_tsv
from terarec.core.data.synth import write_synthetic


def register(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser("synth", help="write synthetic Criteo-shaped data with a known hidden model")
    synth.add_argument("--out", required=True, help="output directory (gets train/, eval/, meta.json)")
    synth.add_argument("--rows", required=True, type=int, help="rows in all (train + eval)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--cardinality-scale", type=float, default=1e-3,
                       help="times Criteo Kaggle's per-feature cardinalities (default 1e-3)")
    synth.add_argument("--tasks", default="click", help="comma-separated task names, e.g. click,conversion")
    synth.add_argument("--eval-fraction", type=float, default=0.1)
    synth.set_defaults(func=run_synth)

    convert = subparsers.add_parser("convert", help="convert Criteo TSV files to terarec parquet")
    convert.add_argument("--in", dest="inputs", required=True, nargs="+",
                         help="Criteo TSV files or globs (plain or .gz), e.g. 'day_*.gz', read in natural order")
    convert.add_argument("--out", required=True, help="output directory (gets train/, eval/ and meta.json)")
    convert.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    convert.add_argument("--eval-fraction", type=float, default=0.1)
    convert.add_argument("--split", choices=["hash", "tail"], default="hash",
                         help="eval rows: a hash of the line number, or the last --eval-fraction of the lines (time order)")
    convert.add_argument("--eval-from", help="this input file and the ones after it are the eval split (e.g. day_23)")
    convert.add_argument("--min-count", type=int, default=1,
                         help="IDs seen fewer times in the training lines map to one out-of-vocabulary ID per feature")
    convert.set_defaults(func=run_convert)


def run_synth(args: argparse.Namespace) -> int:
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    summary = write_synthetic(args.out, args.rows, seed=args.seed, cardinality_scale=args.cardinality_scale,
                              tasks=tasks, eval_fraction=args.eval_fraction)
    rates = ", ".join(f"{task} {rate:.4f}" for task, rate in summary.label_rates.items())
    print(f"Wrote {summary.rows} synthetic rows to {summary.out_dir} ({summary.train_rows} train, "
          f"{summary.eval_rows} eval, {len(summary.files)} parquet files; seed {summary.seed}). "
          f"Label rates: {rates}. Details in {summary.out_dir}/meta.json.")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    summary = convert_tsv(args.inputs, args.out, eval_fraction=args.eval_fraction, strict=args.strict,
                          split=args.split, eval_from=args.eval_from, min_count=args.min_count)
    errors = "; ".join(("" if len(summary.inputs) == 1 else f"{error.path} ") + f"line {error.line}: {error.reason}"
                       for error in summary.first_errors)
    print(f"Converted {' '.join(summary.inputs)} to {args.out}: {summary.rows_written} rows ({summary.train_rows} train, "
          f"{summary.eval_rows} eval, {len(summary.files)} parquet files), {summary.malformed} malformed lines "
          f"skipped" + (f" (first: {errors})." if errors else "."))
    return 0
