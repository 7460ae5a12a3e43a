"""`terarec plan`: what a job would do on N GPUs before it runs: samples/s per wire format, memory per GPU per
tier, and the wire format to pick. The arithmetic is core/cost_model.py; its device times come from
bench/scale_model.py (measured on one GPU, or the placeholders it labels as such).

    terarec plan --config job.yaml --gpus 64 --link ib400 [--rows 1e9] [--intra pcie4]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from terarec.core.config import load_config
from terarec.core.cost_model import (LINKS, NODE_LINKS, WIRES, DeviceCosts, KeyDistribution, fabric_for,
                                     memory_per_gpu, pick_wire, predict_step)
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.data.schema import NUM_DENSE, NUM_SPARSE, read_data_meta
from terarec.core.data.synth import ZIPF_EXPONENT, cardinalities_for
from terarec.core.errors import UserError
from terarec.models import Embedding
from terarec.core.build import store_width
from terarec.models.registry import build_model
from terarec.store import DeviceStore, feature_keys, make_sparse_optimizer

DEFAULT_INPUTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "scale_model.json"
DENSE_OPTIMIZER_STATES = {"sgd": 0, "adagrad": 1, "adam": 2}


def register(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="predict samples/s, memory per GPU and the wire format on N GPUs")
    plan.add_argument("--config", help="YAML job config (what `terarec train --config` reads)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.add_argument("--data", help="data directory (default: the config's)")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in all, 8 a node")
    plan.add_argument("--link", default="ib400", help=f"network link, or the node's link up to 8 GPUs: {', '.join(LINKS)}")
    plan.add_argument("--intra", help=f"the node's link when --link names the network: {', '.join(NODE_LINKS)} (default nvlink4)")
    plan.add_argument("--rows", type=float, help="rows of all tables (default: the data's cardinalities, meta.json)")
    plan.add_argument("--gpu-memory-gb", type=float, default=141.0, help="memory of one GPU (default: an H200)")
    plan.add_argument("--host-memory-gb", type=float, default=2048.0, help="host memory of a node (default 2 TB)")
    plan.add_argument("--overlap", action="store_true", help="assume the exchange runs under compute (not as built)")
    plan.add_argument("--inputs", default=str(DEFAULT_INPUTS), help="measured device times (bench/scale_model.py)")
    plan.set_defaults(func=run_plan)


def read_costs(path: str) -> tuple[DeviceCosts, str]:
    """The GPU times of a scale_model.json (or of one --measure-gpu file) and where they came from."""
    if not os.path.isfile(path):
        raise UserError(f"--inputs {path} does not exist; run `python bench/scale_model.py` (see bench/README.md)")
    try:
        with open(path) as stream:
            figures = json.load(stream)["figures"]
        costs = DeviceCosts(**(figures["inputs"]["gpu"]["costs"] if "inputs" in figures else figures["costs"]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"--inputs {path} is not a bench/scale_model.py result ({type(error).__name__}: {error})") from None
    return costs, costs.source


def key_counts(data: str, batch: int, gpus: int, meta: dict) -> tuple[float, float, str]:
    """(unique keys of one GPU's batch, keys one owner serves, how they were found)."""
    if "cardinalities" in meta and "zipf_exponent" in meta:
        keys = KeyDistribution(tuple(meta["cardinalities"].values()), meta["zipf_exponent"])
        return (keys.expected_unique(batch), keys.expected_unique(batch * gpus) / gpus,
                f"expected from {data}/meta.json (cardinalities, Zipf {keys.exponent})")
    if os.path.isdir(data):
        with BatchReader(list_split_files(data, "train"), batch, shuffle=False, pin_memory=False) as reader:
            sample = next(iter(reader), None)
        if sample is not None:
            unique = torch.unique(feature_keys(sample.sparse)).numel()
            return unique, unique, f"counted in one batch of {data}; owners assumed to merge no keys (an upper bound)"
    keys = KeyDistribution(tuple(cardinalities_for(1.0)), ZIPF_EXPONENT)
    return (keys.expected_unique(batch), keys.expected_unique(batch * gpus) / gpus,
            f"ASSUMED: {data} not found, Criteo Kaggle cardinalities with Zipf {ZIPF_EXPONENT}")


def run_plan(args: argparse.Namespace) -> int:
    flags = {"data": args.data} if args.data else {}
    config = load_config(args.config, args.set, flags)
    if not 1 <= args.gpus <= 65536:
        raise UserError(f"--gpus must be between 1 and 65536, got {args.gpus}")
    batch = config.batch_size // args.gpus
    if batch < 1:
        raise UserError(f"batch_size {config.batch_size} is smaller than --gpus {args.gpus}; raise batch_size")
    try:
        fabric = fabric_for(args.link, args.intra)
    except ValueError as error:
        raise UserError(f"--link/--intra: {error}") from None
    if args.intra and args.link in NODE_LINKS:
        raise UserError(f"--intra names the node's link; --link {args.link} already does (give --link eth100 or ib400)")
    meta = read_data_meta(config.data)
    rows = args.rows or sum(meta.get("cardinalities", {}).values())
    if not rows or rows < 1:
        raise UserError(f"how many rows? {config.data}/meta.json has no cardinalities: give --rows (e.g. --rows 1e9)")
    measured, source = read_costs(args.inputs)
    dim = store_width(config)
    optimizer = make_sparse_optimizer(config.embedding.optimizer, config.sparse_lr)
    model = build_model(config.model, Embedding(DeviceStore(dim, optimizer)), NUM_DENSE, NUM_SPARSE, config.model_section())
    dense_params = sum(p.numel() for p in model.parameters())
    costs = measured.scaled(batch, dim, dense_params)
    unique, owned, how = key_counts(config.data, batch, args.gpus, meta)
    predictions = {wire: predict_step(costs, None, args.gpus, fabric, wire, overlap=args.overlap, unique_keys=unique,
                                      owned_keys=owned) for wire in WIRES}
    nodes = math.ceil(args.gpus / fabric.gpus_per_node)
    print(f"terarec plan: {config.model}, {args.gpus} GPUs ({nodes} node{'s' * (nodes > 1)}), {fabric.name}; "
          f"{batch} samples per GPU a step (batch_size {config.batch_size})")
    print(f"  device times: {measured.device} ({source}); dense part scaled by batch x parameters "
          f"({dense_params:,} here, {measured.dense_params:,} measured)")
    print(f"  keys: {unique:,.0f} unique per GPU batch, {owned:,.0f} per owner after merging; {how}")
    print(f"  {'wire':<5} {'samples/s/GPU':>14} {'all GPUs':>12} {'step ms':>8}  (compute + exchange + all-reduce ms)")
    for wire, p in predictions.items():
        compute = p.ms["dense"] + p.ms["store"] + p.ms["pack"] + p.ms["codec"]
        print(f"  {wire:<5} {p.samples_per_s_per_gpu:>14,.0f} {p.samples_per_s_per_gpu * args.gpus:>12,.0f} "
              f"{p.ms['step']:>8.2f}  ({compute:.2f} + {p.ms['exchange']:.2f} + {p.ms['all_reduce']:.2f})")
    wire, why = pick_wire(predictions)
    print(f"  pick: embedding.comm_dtype={wire} embedding.grad_comm_dtype={wire}: {why}")
    try:
        tiers = memory_per_gpu(int(rows), dim, len(optimizer.state_names), args.gpus, config.store.kind,
                               config.store.cache_bytes, config.store.host_bytes, args.gpu_memory_gb * 1e9,
                               args.host_memory_gb * 1e9 / fabric.gpus_per_node, dense_params,
                               DENSE_OPTIMIZER_STATES[config.dense_optimizer.name])
    except ValueError as error:
        raise UserError(str(error)) from None
    print(f"  memory per GPU ({config.store.kind} store, {int(rows):,} rows of {dim} + "
          f"{len(optimizer.state_names)} optimizer state(s), activations not counted):")
    gpu = tiers["gpu_rows"] + tiers["gpu_dense"]
    print(f"    GPU  {gpu / 1e9:10.2f} GB  (rows {tiers['gpu_rows'] / 1e9:.2f}, dense {tiers['gpu_dense'] / 1e9:.3f})"
          + ("  MORE THAN THE GPU HOLDS: use a cached store or more GPUs" if gpu > args.gpu_memory_gb * 1e9 else ""))
    host_share = args.host_memory_gb * 1e9 / fabric.gpus_per_node
    print(f"    host {tiers['host_rows'] / 1e9:10.2f} GB" + ("  MORE THAN A GPU'S SHARE OF HOST MEMORY: use cached_ssd "
                                                          "or more GPUs" if tiers["host_rows"] > host_share else ""))
    print(f"    SSD  {tiers['ssd_rows'] / 1e9:10.2f} GB")
    return 0
