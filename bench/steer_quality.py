"""A run that watches itself: every zoo model's best eval AUC (keep_best, eval_every) against logistic
regression's and against DeepCTR-Torch's best epoch; and the default batch size against batch sizes chosen by hand.

Part `zoo`: synthetic data (`terarec data synth --rows 200000 --seed 7`), batch 1024, 300 steps (about 1.7
epochs), an evaluation every 50 steps and at the epoch's end, on one training worker (the code `terarec train` runs
on each Ray worker, without Ray). Multi-task models (MMoE) and a logistic regression to compare them with train on
the same rows with two label columns (click, conversion; the figures are the click task's). DeepCTR-Torch 0.3.0's
models (`--peers`: DeepFM, DCN, DCN-V2, PNN, xDeepFM, MMoE) train on the batches terarec's run with the same seed
trains on, in the same order (same sizes and optimizers as bench/zoo_cpu.py), for 2 epochs, evaluated every 50 steps
and at each epoch's end.
Part `batch`: one epoch of each `--batch-models` model (DeepFM by default) at the default batch size
(core/steering.py's rule) and at hand-picked ones, on 100k and 200k rows.
Part `sparse_lr`: the zoo part's run of LR, DLRM and DeepFM at several sparse lrs, on the zoo's data (rare IDs),
on data with ten times fewer distinct IDs and on the tests' data (tests/test_train_cli.py): where each model's
default sparse lr (models/registry.py, and core/steering.py's rule for the models that opt in) stands.
Writes bench/results/steer_quality.json.

    python bench/steer_quality.py [--parts zoo batch sparse_lr] [--threads 1]
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import tempfile
import time

import numpy as np
import torch

from terarec.actors.train_worker import TrainWorker
from terarec.core.config import load_config, merge
from terarec.core.data.reader import BatchReader, count_rows, list_split_files
from terarec.core.data.schema import SPARSE_COLUMNS, read_data_meta
from terarec.core.data.synth import write_synthetic
from terarec.core.metrics import roc_auc
from terarec.core.steering import choose_sparse_lr, key_recurrence
from terarec.kernels.comm import LocalCommunicator
from terarec.models import Batch, DCNConfig, DeepFMConfig, XDeepFMConfig
from terarec.models.registry import MODELS

from results import RESULTS, record  # bench/results.py
from zoo_cpu import DeepCTR, configs, load  # bench/zoo_cpu.py: the peer harness

PEER_MODELS = ("deepfm", "dcn", "dcnv2", "pnn", "xdeepfm", "mmoe")
MULTI_TASK = ("click", "conversion")  # the label columns of the multi-task models' data
PEER_SIZES = {"deep_mlp": DeepFMConfig().deep_mlp, "cin_layers": XDeepFMConfig().cin_layers,
              "cross_layers": DCNConfig().cross_layers}


def train_terarec(data: str, run_dir: str, model: str, steps: int | None, batch_size: int | None,
                  eval_every: int, sparse_lr: float | None = None, seed: int = 0) -> dict:
    """One run with periodic evaluation and keep_best; returns its eval curve and final figures."""
    config = load_config(flags={"data": data, "run_dir": run_dir, "model": model, "steps": steps, "seed": seed,
                                "batch_size": batch_size, "eval_every": eval_every, "keep_best": eval_every > 0,
                                "log_every": 10_000, "embedding.lr": sparse_lr})
    worker = TrainWorker(config, LocalCommunicator(), torch.device("cpu"))
    curve = []
    started = time.perf_counter()
    worker.train(on_eval=lambda step, metrics, best: curve.append({"step": step, "auc": round(metrics["auc"], 4)}))
    final = worker.final_metrics()
    return {"model": model, "batch_size": worker.config.batch_size, "steps": worker.step,
            "best_auc": round(final.get("best_auc", final["auc"]), 4), "best_step": final.get("best_step", worker.step),
            "final_auc": round(final["auc"], 4), "mean_pred": round(final["mean_pred"], 4),
            "mean_label": round(final["mean_label"], 4), "curve": curve, "seconds": round(time.perf_counter() - started, 1)}


def train_peer(data: str, model: str, batch_size: int, epochs: int, eval_every: int, seed: int = 0) -> dict:
    """DeepCTR-Torch on the batches terarec's run with `seed` trains on, in its order (its reader, shuffled by the
    seed each epoch): eval AUC every `eval_every` steps and at each epoch's end (the click task's for a multi-task
    model, which learns every label column as terarec's does). Seed 0 draws the initial weights from
    DeepCTR-Torch's default seed (1024), another seed from that seed."""
    tasks = len(MULTI_TASK) if MODELS[model].multi_task else 1
    train, evaluation = load(data, "train", tasks), load(data, "eval", tasks)
    with BatchReader(list_split_files(data, "train"), batch_size, seed=seed, shuffle=True, drop_last=True,
                     epochs=epochs) as reader:
        batches = [Batch(batch.dense, batch.sparse, batch.labels[:, :tasks]) for batch in reader]
        steps_per_epoch = reader.steps_per_epoch
    vocabularies = [np.unique(train.sparse[:, f].numpy()) for f in range(len(SPARSE_COLUMNS))]
    # the sizes of terarec's model (its config section), the other models' defaults for the sizes it has not
    sizes = PEER_SIZES | load_config(flags={"data": data, "model": model}).model_section().model_dump(include=set(PEER_SIZES))
    _, make = configs(sizes["deep_mlp"], sizes["cin_layers"], sizes["cross_layers"], 0.05 / 3**0.5, tasks,
                      seed or 1024)[model]
    torch.manual_seed(seed)
    peer = DeepCTR(make, vocabularies, 16, MODELS[model].sparse_lr, 3e-3)
    encoded_eval = peer.encode(evaluation)
    labels = evaluation.labels[:, 0]
    curve, epoch_aucs = [], []
    for step, batch in enumerate(batches, 1):
        peer.step(peer.encode(batch))
        if step % eval_every == 0:
            curve.append({"step": step, "auc": round(roc_auc(labels, peer.scores(encoded_eval)), 4)})
        if step % steps_per_epoch == 0:
            epoch_aucs.append(round(roc_auc(labels, peer.scores(encoded_eval)), 4))
    return {"model": model, "epoch_aucs": epoch_aucs, "best_epoch_auc": max(epoch_aucs),
            "best_auc_any_step": max([p["auc"] for p in curve] + epoch_aucs), "steps_per_epoch": steps_per_epoch,
            "curve": curve}


def zoo_part(workdir: str, args, save) -> None:
    """Single-task models under "zoo"; multi-task ones under "zoo_multi_task", on the same rows with two label
    columns, beside a logistic regression on those; with another training seed than 0 under "zoo seed N" and
    "zoo_multi_task seed N". Each run is saved as it ends (a long xDeepFM run on a busy CPU loses nothing before it)."""
    for seed in args.seeds:
        zoo_runs(workdir, args, save, seed)


def zoo_runs(workdir: str, args, save, seed: int) -> None:
    multi = [model for model in args.models if MODELS[model].multi_task]
    for key, tasks, models, peers in (
            ("zoo", ("click",), [model for model in args.models if model not in multi],
             [model for model in args.peers if not MODELS[model].multi_task]),
            ("zoo_multi_task", MULTI_TASK, ["lr", *multi] if multi else [],
             [model for model in args.peers if MODELS[model].multi_task])):
        if not models and not peers:
            continue
        data = os.path.join(workdir, f"{key}-data")
        if not os.path.isdir(data):
            write_synthetic(data, rows=args.rows, seed=7, tasks=tasks)
        key = key if seed == 0 else f"{key} seed {seed}"
        for model in models:
            run = train_terarec(data, os.path.join(workdir, key, model), model, args.steps, args.batch_size,
                                args.eval_every, seed=seed)
            print(key, {name: value for name, value in run.items() if name != "curve"}, flush=True)
            save({key: {"terarec": {model: run}}})
        for model in peers:
            peer = train_peer(data, model, args.batch_size, args.peer_epochs, args.eval_every, seed)
            print(key, {name: value for name, value in peer.items() if name != "curve"}, flush=True)
            save({key: {"deepctr_torch": {model: peer}}})


def compare(zoo: dict) -> dict:
    """Each zoo model's best AUC minus LR's, minus the same DeepCTR-Torch model's at its best epoch (where the
    peer has it), and minus the best DeepCTR-Torch model's."""
    runs, peers = zoo.get("terarec", {}), zoo.get("deepctr_torch", {})
    peer_best = max((peer["best_epoch_auc"] for peer in peers.values()), default=None)

    def minus(auc: float, other: float | None) -> float | None:
        return None if other is None else round(auc - other, 4)

    return {model: {"best_auc": run["best_auc"],
                    "minus_lr": minus(run["best_auc"], runs.get("lr", {}).get("best_auc")),
                    "minus_same_deepctr_model": minus(run["best_auc"], peers.get(model, {}).get("best_epoch_auc")),
                    "minus_best_deepctr_model": minus(run["best_auc"], peer_best)}
            for model, run in runs.items()}


def batch_part(workdir: str, args, save) -> None:
    """One epoch per batch size; the default's AUC against the best hand-picked one. DeepFM's figures under
    "batch", another model's under "batch MODEL"; with another training seed than 0, " seed N" appended."""
    for rows in args.batch_rows:
        data = os.path.join(workdir, f"batch-data-{rows}")
        write_synthetic(data, rows=rows, seed=7)
        for model, seed in itertools.product(args.batch_models, args.batch_seeds):
            by_batch = {}
            for batch_size in [None, *args.batches]:
                run = train_terarec(data, os.path.join(workdir, f"batch-{model}-{rows}-{seed}-{batch_size}"), model,
                                    None, batch_size, 0, seed=seed)
                by_batch["default" if batch_size is None else batch_size] = run
                print(model, rows, seed, batch_size, run["batch_size"], run["final_auc"], flush=True)
            key = "batch" if model == "deepfm" else f"batch {model}"
            save({key if seed == 0 else f"{key} seed {seed}": {str(rows): {
                "default_batch_size": by_batch["default"]["batch_size"], "default_auc": by_batch["default"]["final_auc"],
                "auc_by_batch_size": {str(batch): run["final_auc"] for batch, run in by_batch.items()
                                      if batch != "default"}}}})


def sparse_lr_part(workdir: str, args, save) -> None:
    """The zoo part's run at several sparse lrs, per dataset `SCALE[:SEED[:ROWS]]` (seed 7 and --rows unless
    given): at cardinality scale 1e-3 (the default of `terarec data synth`) most IDs are rare; at 1e-4 they recur
    ten times as often. With each, how often a training key recurs and the sparse lr core/steering.py's rule
    picks for each model (the model's fixed default where it does not opt in)."""
    for spec in args.lr_datasets:
        parts = spec.split(":")
        scale, seed, rows = float(parts[0]), int(parts[1]) if parts[1:] else 7, int(parts[2]) if parts[2:] else args.rows
        key = str(scale) if (seed, rows) == (7, args.rows) else f"{scale} seed {seed} {rows} rows"
        data = os.path.join(workdir, f"lr-data-{scale}-{seed}-{rows}")
        write_synthetic(data, rows=rows, seed=seed, cardinality_scale=scale)
        train_rows = count_rows(list_split_files(data, "train"))
        recurrence = key_recurrence(read_data_meta(data), train_rows)
        for model in args.lr_models:
            choice = choose_sparse_lr(load_config(flags={"data": data, "model": model}), train_rows, read_data_meta(data))
            chosen = choice.lr if choice else MODELS[model].sparse_lr
            save({"sparse_lr": {key: {"key_recurrence": round(recurrence.times, 1),
                                      model: {"default": MODELS[model].sparse_lr, "rule_picks": chosen}}}})
            for sparse_lr in args.sparse_lrs:
                run = train_terarec(data, os.path.join(workdir, f"lr-{key}-{model}-{sparse_lr}"), model, args.steps,
                                    args.batch_size, args.eval_every, sparse_lr)
                print(key, model, sparse_lr, run["best_auc"], flush=True)
                save({"sparse_lr": {key: {model: {"best_auc_by_sparse_lr": {str(sparse_lr): run["best_auc"]}}}}})


def batch_summary(batch: dict) -> dict:
    """Per dataset size: the best hand-picked batch size and the default's AUC minus its."""
    summary = {}
    for rows, sweep in batch.items():
        hand = sweep["auc_by_batch_size"]
        best = max(hand, key=hand.get)
        summary[rows] = {"default_batch_size": sweep["default_batch_size"], "best_hand_batch_size": int(best),
                         "default_minus_best": round(sweep["default_auc"] - hand[best], 4)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["zoo", "batch"], choices=["zoo", "batch", "sparse_lr"])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the zoo part")
    parser.add_argument("--peer-epochs", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 4096])
    parser.add_argument("--batch-models", nargs="+", default=["deepfm"], choices=list(MODELS))
    parser.add_argument("--batch-seeds", type=int, nargs="+", default=[0], help="training seeds of the batch part")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--peers", nargs="*", default=["deepfm", "dcn"], choices=PEER_MODELS)
    parser.add_argument("--lr-datasets", nargs="+", default=["1e-3", "1e-4", "1e-4:1:400000"],
                        help="SCALE[:SEED[:ROWS]] synth data of the sparse_lr part (seed 7, --rows by default)")
    parser.add_argument("--lr-models", nargs="+", default=["lr", "dlrm", "deepfm"], choices=list(MODELS))
    parser.add_argument("--sparse-lrs", type=float, nargs="*", default=[0.2, 0.1, 0.05, 0.03],
                        help="none: only record how often keys recur and the lr each model's default takes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--note", default="", help="recorded with the settings: which invocations made the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = os.path.join(RESULTS, "steer_quality.json")

    def save(figures: dict) -> None:
        """Merge into the recorded figures (a run of some parts or models keeps the others') and rewrite, under a
        lock: invocations running side by side (one per core) keep each other's figures."""
        with open(os.path.join(tempfile.gettempdir(), "terarec-steer_quality.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.isfile(path):
                with open(path) as stream:
                    figures = merge(json.load(stream)["figures"], figures)
            for key in [key for key in figures if key.startswith("zoo") and not key.endswith("comparison")]:
                figures[f"{key} comparison" if " seed " in key else f"{key}_comparison"] = compare(figures[key])
            sweeps = [key for key in figures if key == "batch" or key.startswith("batch ") and not key.endswith("summary")]
            for key in sweeps:
                figures["batch_summary" if key == "batch" else f"{key} summary"] = batch_summary(figures[key])
            record("steer_quality", figures, dict(vars(args)))

    with tempfile.TemporaryDirectory() as workdir:
        if "zoo" in args.parts:
            zoo_part(workdir, args, save)
        if "batch" in args.parts:
            batch_part(workdir, args, save)
        if "sparse_lr" in args.parts:
            sparse_lr_part(workdir, args, save)
    save({})  # the comparisons over everything recorded


if __name__ == "__main__":
    main()
