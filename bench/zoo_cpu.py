"""The zoo against DeepCTR-Torch on CPU: DeepFM, xDeepFM, DCN, DCN-V2 and PNN trained side by side.

Same synthetic data (click task), same sizes (embedding dim, hidden layers, CIN maps, cross layers), same
optimizers (Adagrad on the embeddings, Adam on the rest), no regularization, same batches in the same order.
terarec reads raw 64-bit IDs through its store; DeepCTR-Torch reads IDs label-encoded ahead of time into
nn.Embedding tables (its own recipe). The two train in lockstep, chunk by chunk, so a busy machine slows
both alike. Writes bench/results/zoo_cpu.json and zoo_cpu.md.

    python bench/zoo_cpu.py [--rows 100000] [--epochs 2] [--batch-size 256] [--dim 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from terarec.models import (Batch, DCNConfig, DCNv2Config, DeepFMConfig, Embedding, MMoEConfig, PNNConfig,
                            SparseDenseOptimizer, XDeepFMConfig, build_model, model_spec)
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.data.schema import DENSE_COLUMNS, NUM_DENSE, NUM_SPARSE, SPARSE_COLUMNS
from terarec.core.data.synth import write_synthetic
from terarec.core.metrics import roc_auc
from terarec.store import DeviceStore, SparseAdagrad

from results import RESULTS, record  # bench/results.py

with contextlib.redirect_stdout(io.StringIO()):  # deepctr_torch prints a version check on import
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DCN as PeerDCN
    from deepctr_torch.models import MMOE as PeerMMoE
    from deepctr_torch.models import PNN as PeerPNN
    from deepctr_torch.models import DeepFM as PeerDeepFM
    from deepctr_torch.models import xDeepFM as PeerXDeepFM

CHUNK = 25  # batches per lockstep turn


def configs(deep: list[int], cin: list[int], cross_layers: int, init_std: float, tasks: int = 2,
            seed: int = 1024) -> dict:
    """terarec config and DeepCTR-Torch constructor of each model, at the same sizes (MMoE: terarec's default
    sizes, a linear gate as terarec's, `tasks` label columns: DeepCTR's MMOE needs at least two). `seed`: DeepCTR's
    initial weights (its default, 1024)."""
    no_l2 = dict(l2_reg_embedding=0.0, l2_reg_dnn=0.0, init_std=init_std, seed=seed)
    mmoe = MMoEConfig()
    return {
        "deepfm": (DeepFMConfig(deep_mlp=deep),
                   lambda lin, dnn: PeerDeepFM(lin, dnn, dnn_hidden_units=deep, l2_reg_linear=0.0, **no_l2)),
        "xdeepfm": (XDeepFMConfig(cin_layers=cin, deep_mlp=deep),
                    lambda lin, dnn: PeerXDeepFM(lin, dnn, dnn_hidden_units=deep, cin_layer_size=cin,
                                                 cin_split_half=True, cin_activation="linear", l2_reg_linear=0.0,
                                                 l2_reg_cin=0.0, **no_l2)),
        "dcn": (DCNConfig(cross_layers=cross_layers, deep_mlp=deep, structure="parallel"),
                lambda lin, dnn: PeerDCN([], dnn, cross_num=cross_layers, cross_parameterization="vector",
                                         dnn_hidden_units=deep, l2_reg_linear=0.0, l2_reg_cross=0.0, **no_l2)),
        "dcnv2": (DCNv2Config(cross_layers=cross_layers, deep_mlp=deep, structure="parallel"),
                  lambda lin, dnn: PeerDCN([], dnn, cross_num=cross_layers, cross_parameterization="matrix",
                                           dnn_hidden_units=deep, l2_reg_linear=0.0, l2_reg_cross=0.0, **no_l2)),
        "pnn": (PNNConfig(product="inner", deep_mlp=deep),
                lambda lin, dnn: PeerPNN(dnn, dnn_hidden_units=deep, use_inner=True, use_outter=False, **no_l2)),
        "mmoe": (mmoe,
                 lambda lin, dnn: PeerMMoE(dnn, num_experts=mmoe.num_experts, expert_dnn_hidden_units=mmoe.expert_mlp,
                                           gate_dnn_hidden_units=(), tower_dnn_hidden_units=mmoe.tower_mlp,
                                           task_types=("binary",) * tasks, task_names=[f"task{t}" for t in range(tasks)],
                                           l2_reg_linear=0.0, **no_l2)),
    }


def load(data_dir: str, split: str, tasks: int = 1) -> Batch:
    """The whole split as one batch, with its first `tasks` label columns."""
    with BatchReader(list_split_files(data_dir, split), 1 << 30, epochs=1, shuffle=False, drop_last=False) as reader:
        (batch,) = list(reader)
    return Batch(batch.dense, batch.sparse, batch.labels[:, :tasks])


class Terarec:
    """A zoo model over a DeviceStore: Adagrad on the store's rows, Adam on the dense parameters."""

    def __init__(self, name, config, dim: int, sparse_lr: float, dense_lr: float):
        self.store = DeviceStore(model_spec(name).store_width(dim), SparseAdagrad(lr=sparse_lr))
        self.model = build_model(name, Embedding(self.store), NUM_DENSE, NUM_SPARSE, config)
        self.optimizer = SparseDenseOptimizer(self.model, torch.optim.Adam(self.model.parameters(), lr=dense_lr))

    def step(self, batch: Batch) -> None:
        self.model.train()
        loss = F.binary_cross_entropy_with_logits(self.model(batch), batch.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def scores(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            return self.model(batch)[:, 0]

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) + self.store.dim * len(self.store)


class DeepCTR:
    """A DeepCTR-Torch model over label-encoded IDs, driven by the same loop (its `fit` adds only bookkeeping)."""

    def __init__(self, make, vocabularies: list[np.ndarray], dim: int, sparse_lr: float, dense_lr: float):
        self.vocabularies = vocabularies
        sparse = [SparseFeat(name, len(vocab) + 1, embedding_dim=dim) for name, vocab in zip(SPARSE_COLUMNS, vocabularies)]
        dense = [DenseFeat(name, 1) for name in DENSE_COLUMNS]
        with contextlib.redirect_stdout(io.StringIO()):
            self.model = make(sparse + dense, sparse + dense)
        embeddings = [p for name, p in self.model.named_parameters() if "embedding_dict" in name]
        ids = {id(p) for p in embeddings}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        self.optimizers = [torch.optim.Adagrad(embeddings, lr=sparse_lr), torch.optim.Adam(rest, lr=dense_lr)]

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw IDs -> 1-based vocabulary indexes (0 for unseen), laid out in the model's feature_index order."""
        columns = {name: batch.dense[:, d] for d, name in enumerate(DENSE_COLUMNS)}
        for f, (name, vocab) in enumerate(zip(SPARSE_COLUMNS, self.vocabularies)):
            ids = batch.sparse[:, f].numpy()
            index = np.minimum(np.searchsorted(vocab, ids), len(vocab) - 1)
            columns[name] = torch.from_numpy(np.where(vocab[index] == ids, index + 1, 0)).float()
        x = torch.stack([columns[name] for name in self.model.feature_index], dim=1)
        return x, batch.labels

    def step(self, encoded: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, labels = encoded
        self.model.train()
        loss = F.binary_cross_entropy(self.model(x), labels)  # DeepCTR's models end in a sigmoid
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()

    def scores(self, encoded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The first task's (click) predictions."""
        self.model.eval()
        with torch.no_grad():
            return self.model(encoded[0])[:, 0]

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cardinality-scale", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--deep", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--cin", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--cross-layers", type=int, default=3)
    parser.add_argument("--sparse-lr", type=float, default=0.05)
    parser.add_argument("--dense-lr", type=float, default=3e-3)
    parser.add_argument("--peer-init-std", type=float, default=0.05 / 3**0.5,
                        help="DeepCTR's init_std (embeddings and DNN weights); the default is the std of terarec's "
                             "initial rows, uniform in +-0.05 (DeepCTR's own default is 1e-4)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--models", nargs="+", default=["deepfm", "xdeepfm", "dcn", "dcnv2", "pnn"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as data_dir:
        write_synthetic(data_dir, rows=args.rows, seed=0, cardinality_scale=args.cardinality_scale)
        train, evaluation = load(data_dir, "train"), load(data_dir, "eval")
    batches = [train.slice(i, i + args.batch_size) for i in range(0, len(train) - args.batch_size + 1, args.batch_size)]
    vocabularies = [np.unique(train.sparse[:, f].numpy()) for f in range(len(SPARSE_COLUMNS))]
    table = configs(args.deep, args.cin, args.cross_layers, args.peer_init_std)

    rows = []
    progress = tqdm(total=len(args.models) * args.epochs * len(batches), unit="batch", desc="zoo vs deepctr")
    for name in args.models:
        config, make = table[name]
        torch.manual_seed(0)
        ours = Terarec(name, config, args.dim, args.sparse_lr, args.dense_lr)
        theirs = DeepCTR(make, vocabularies, args.dim, args.sparse_lr, args.dense_lr)
        encoded = [theirs.encode(batch) for batch in batches]  # their input pipeline, outside the timing
        seconds = {"terarec": 0.0, "deepctr": 0.0}
        for _ in range(args.epochs):
            for start in range(0, len(batches), CHUNK):
                for side, model, inputs in (("terarec", ours, batches), ("deepctr", theirs, encoded)):
                    began = time.perf_counter()
                    for item in inputs[start:start + CHUNK]:
                        model.step(item)
                    seconds[side] += time.perf_counter() - began
                progress.update(len(batches[start:start + CHUNK]))
        samples = args.epochs * len(batches) * args.batch_size
        labels = evaluation.labels[:, 0]
        row = {"model": name,
               "terarec_auc": round(roc_auc(labels, ours.scores(evaluation)), 4),
               "deepctr_auc": round(roc_auc(labels, theirs.scores(theirs.encode(evaluation))), 4),
               "terarec_samples_per_s": round(samples / seconds["terarec"]),
               "deepctr_samples_per_s": round(samples / seconds["deepctr"]),
               "terarec_params": ours.params(), "deepctr_params": theirs.params()}
        row["auc_diff"] = round(row["terarec_auc"] - row["deepctr_auc"], 4)
        row["speedup"] = round(row["terarec_samples_per_s"] / row["deepctr_samples_per_s"], 2)
        rows.append(row)
        tqdm.write(f"{name}: {row}")
    progress.close()

    settings = dict(vars(args))
    settings.update(train_rows=len(train), eval_rows=len(evaluation), deepctr_torch=deepctr_torch.__version__,
                    optimizers=f"Adagrad(lr={args.sparse_lr}) on embeddings, Adam(lr={args.dense_lr}) on the rest")
    record("zoo_cpu", {"rows": rows}, settings)
    write_markdown(rows, settings)


def write_markdown(rows: list[dict], settings: dict) -> None:
    lines = [f"# Zoo vs DeepCTR-Torch {settings['deepctr_torch']} on CPU ({settings['threads']} thread(s))", "",
             f"Synthetic click data: {settings['train_rows']} train / {settings['eval_rows']} eval rows, "
             f"cardinality scale {settings['cardinality_scale']}; {settings['epochs']} epochs of batch "
             f"{settings['batch_size']}; dim {settings['dim']}, deep {settings['deep']}, CIN {settings['cin']}, "
             f"{settings['cross_layers']} cross layers; {settings['optimizers']}; DeepCTR init_std "
             f"{settings['peer_init_std']:.4g}. Same batches in the same order, the two trained in lockstep. "
             f"Written by bench/zoo_cpu.py.", "",
             "| model | terarec AUC | DeepCTR AUC | diff | terarec samples/s | DeepCTR samples/s | speedup | "
             "terarec params (dense + rows) | DeepCTR params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['terarec_auc']:.4f} | {row['deepctr_auc']:.4f} | {row['auc_diff']:+.4f} | "
                     f"{row['terarec_samples_per_s']} | {row['deepctr_samples_per_s']} | {row['speedup']:.2f}x | "
                     f"{row['terarec_params']} | {row['deepctr_params']} |")
    path = os.path.join(RESULTS, "zoo_cpu.md")
    with open(path, "w") as stream:
        stream.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
