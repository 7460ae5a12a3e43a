"""DLRM training throughput on CPU: terarec (store + Embedding front) vs plain PyTorch (nn.EmbeddingBag, sparse grads).

Same shapes, same data, same optimizers (sparse Adagrad on the tables, Adam on the dense part), in one run.
Prints a table and writes bench/results/train_cpu.json.

    python bench/train_cpu.py [--rows 200000] [--batch-size 2048] [--steps 60]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn
from tqdm import tqdm

from terarec.models import DLRM, DLRMConfig, Embedding, SparseDenseOptimizer
from terarec.models.dlrm import INTERACTION_PAD_TO
from terarec.kernels.interaction import dot_interaction_reference, interaction_output_dim
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.data.synth import write_synthetic
from terarec.store import DeviceStore, SparseAdagrad

from results import record  # bench/results.py


class PlainDLRM(nn.Module):
    """The same DLRM with one nn.EmbeddingBag per feature over hashed IDs (the usual PyTorch recipe).

    rows_per_table: one size for every table, or one per feature.  sparse: sparse or dense table gradients.
    """

    def __init__(self, rows_per_table: int | list[int], num_sparse: int, dim: int, config: DLRMConfig,
                 sparse: bool = True):
        super().__init__()
        self.rows_per_table = rows_per_table
        sizes = rows_per_table if isinstance(rows_per_table, list) else [rows_per_table] * num_sparse
        self.register_buffer("table_rows", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse) for rows in sizes)
        for table in self.tables:
            nn.init.uniform_(table.weight, -0.05, 0.05)
        self.dense_part = DenseDLRM(dim, num_sparse, config)

    def forward(self, batch):
        ids = torch.remainder(batch.sparse, self.table_rows)
        sparse = torch.stack([table(ids[:, f : f + 1]) for f, table in enumerate(self.tables)], dim=1)
        return self.dense_part(batch.dense, sparse)


class DenseDLRM(nn.Module):
    """DLRM's dense part in plain torch ops: bottom MLP, dot interaction with the [B, F, D] embeddings (padded as
    DLRM pads it), top MLP."""

    def __init__(self, dim: int, num_sparse: int, config: DLRMConfig):
        super().__init__()
        self.bottom = nn.Sequential(*_mlp([13, *config.bottom_mlp, dim], last_relu=True))
        width = interaction_output_dim(dim, num_sparse, pad_to=INTERACTION_PAD_TO)
        self.top = nn.Sequential(*_mlp([width, *config.top_mlp, 1], last_relu=False))

    def forward(self, dense, sparse):
        return self.top(dot_interaction_reference(self.bottom(dense), sparse, pad_to=INTERACTION_PAD_TO))


def _mlp(sizes, last_relu):
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return layers


def time_training(name, model, step_fn, batches, warmup=5):
    for batch in batches[:warmup]:
        step_fn(batch)
    started = time.perf_counter()
    for batch in tqdm(batches[warmup:], desc=name, leave=False):
        step_fn(batch)
    elapsed = time.perf_counter() - started
    return sum(len(b) for b in batches[warmup:]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = DLRMConfig(bottom_mlp=[64], top_mlp=[128, 64])
    with tempfile.TemporaryDirectory() as data:
        write_synthetic(data, rows=args.rows, seed=0, cardinality_scale=1e-3)
        with BatchReader(list_split_files(data, "train"), args.batch_size, shuffle=False, epochs=None) as reader:
            batches = [b for b, _ in zip(reader, range(args.steps + 5))]
    loss_fn = nn.BCEWithLogitsLoss()

    store = DeviceStore(args.dim, SparseAdagrad(lr=0.05))
    ours = DLRM(Embedding(store), 13, 26, config)
    ours_opt = SparseDenseOptimizer(ours, torch.optim.Adam(ours.parameters(), lr=1e-3))

    def ours_step(batch):
        loss = loss_fn(ours(batch), batch.labels)
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()

    distinct = int(max(torch.unique(b.sparse[:, f]).numel() for f in range(26) for b in batches[:1]))
    plain = PlainDLRM(rows_per_table=max(1024, 4 * distinct), num_sparse=26, dim=args.dim, config=config)
    plain_dense = [p for n, p in plain.named_parameters() if not n.startswith("tables")]
    plain_sparse = [p for n, p in plain.named_parameters() if n.startswith("tables")]
    plain_opt = torch.optim.Adam(plain_dense, lr=1e-3)
    plain_sparse_opt = torch.optim.Adagrad(plain_sparse, lr=0.05)

    def plain_step(batch):
        loss = loss_fn(plain(batch), batch.labels)
        plain_opt.zero_grad()
        plain_sparse_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        plain_sparse_opt.step()

    figures = {
        "terarec_samples_per_s": time_training("terarec", ours, ours_step, batches),
        "pytorch_samples_per_s": time_training("pytorch", plain, plain_step, batches),
    }
    figures["ratio"] = figures["terarec_samples_per_s"] / figures["pytorch_samples_per_s"]
    print(f"\n| what | samples/s |\n| --- | --- |\n| terarec DLRM (store + Embedding front) | {figures['terarec_samples_per_s']:,.0f} |"
          f"\n| plain PyTorch DLRM (EmbeddingBag, sparse Adagrad) | {figures['pytorch_samples_per_s']:,.0f} |"
          f"\n| ratio | {figures['ratio']:.2f}x |")
    record("train_cpu", figures, vars(args) | {"threads": torch.get_num_threads(),
                                               "plain_rows_per_table": plain.rows_per_table})


if __name__ == "__main__":
    main()
