"""Synthetic Criteo-shaped data with a known hidden model, for tests and benchmarks without the real dataset.

Rows look like Criteo Kaggle: 13 dense features (log-transformed counts) and 26 categorical features whose
cardinalities are Kaggle's real ones times `cardinality_scale`, with Zipf-distributed IDs (exponent 1.1)
written as arbitrary 64-bit raw IDs. Clicks come from a hidden model: per-(feature, ID) weights, dense
weights, a low-rank factorization-machine term over eight features and two dense x sparse interactions, so
a model with interactions beats logistic regression. A second task (e.g. conversion) can only be 1 on
clicked rows and has its own weights.

>>> summary = write_synthetic("/tmp/synth", rows=100_000, tasks=("click", "conversion"))
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from terarec.core.data.errors import DataArgumentError
from terarec.core.data.schema import (DENSE_COLUMNS, SPARSE_COLUMNS, arrow_schema, label_column, split_writers,
                                          transform_dense, write_meta)
from terarec.kernels.hashing import splitmix64_uint64 as splitmix64

# Distinct values of C1..C26 in Criteo Kaggle (the counts DLRM reports for the 7-day set).
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
ZIPF_EXPONENT = 1.1
FM_FEATURES = (2, 3, 9, 11, 15, 20, 23, 25)  # C3 C4 C10 C12 C16 C21 C24 C26: the interacting features
FM_RANK = 4
DENSE_SPARSE_PAIRS = ((0, 9), (4, 23))  # (I1, C10), (I5, C24): dense value times a per-ID weight
PART_STD = {"linear": 1.0, "dense": 0.5, "fm": 1.0, "dense_sparse": 0.6, "click": 0.5}  # logit std per part
CTR = 0.25
FOLLOW_RATE = 0.2  # mean propensity of each later task (it fires only on clicks: P(conversion | click) ~ 0.25)
CHUNK_ROWS = 65_536  # rows drawn per random stream; the data does not depend on file or row-group sizes
PILOT_ROWS = 65_536  # rows used to standardize the logit parts and calibrate the biases


def cardinalities_for(scale: float) -> list[int]:
    """Kaggle's per-feature cardinalities times `scale`, at least 2."""
    return [max(2, round(c * scale)) for c in KAGGLE_CARDINALITIES]


class HiddenModel:
    """The ground truth behind synthetic labels; `logits(dense, ranks)` is the oracle score, shape [n, T]."""

    def __init__(self, seed: int, cardinalities: Sequence[int], num_tasks: int):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0])))
        self.cardinalities = list(cardinalities)
        self.num_tasks = num_tasks
        weights = (np.arange(1, max(self.cardinalities) + 1, dtype=np.float64)) ** -ZIPF_EXPONENT
        self.cdfs = [np.cumsum(weights[:c]) / weights[:c].sum() for c in self.cardinalities]
        self.id_salts = rng.integers(0, 2**63, size=len(SPARSE_COLUMNS), dtype=np.uint64)
        self.dense_log_mean = rng.uniform(0.0, 4.0, len(DENSE_COLUMNS))
        self.dense_log_std = rng.uniform(0.5, 1.5, len(DENSE_COLUMNS))
        self.dense_zero_rate = rng.uniform(0.1, 0.5, len(DENSE_COLUMNS))
        self.linear = [[rng.normal(size=c) for c in self.cardinalities] for _ in range(num_tasks)]
        self.dense_weights = rng.normal(size=(num_tasks, len(DENSE_COLUMNS)))
        self.factors = [rng.normal(size=(self.cardinalities[f], FM_RANK)) for f in FM_FEATURES]
        self.pair_weights = [rng.normal(size=self.cardinalities[f]) for _, f in DENSE_SPARSE_PAIRS]
        pilot_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2])))
        dense, ranks = self.draw(pilot_rng, PILOT_ROWS)
        self.dense_center = dense.mean(axis=0)
        self.part_scale: list[dict[str, float]] = [{} for _ in range(num_tasks)]
        self.bias = np.zeros(num_tasks)
        for task in range(num_tasks):
            parts = self._parts(task, dense, ranks)
            self.part_scale[task] = {name: PART_STD[name] / max(part.std(), 1e-12) for name, part in parts.items()}
            self.bias[task] = _calibrate(self._combine(task, parts), CTR if task == 0 else FOLLOW_RATE)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Features of n rows: dense [n, 13] float32 (transformed) and Zipf ranks [n, 26] int64."""
        counts = np.floor(np.exp(rng.normal(self.dense_log_mean, self.dense_log_std, (n, len(DENSE_COLUMNS)))))
        counts[rng.random((n, len(DENSE_COLUMNS))) < self.dense_zero_rate] = 0
        uniforms = rng.random((n, len(SPARSE_COLUMNS)))
        ranks = np.empty((n, len(SPARSE_COLUMNS)), dtype=np.int64)
        for f, cdf in enumerate(self.cdfs):
            ranks[:, f] = np.minimum(np.searchsorted(cdf, uniforms[:, f], side="right"), len(cdf) - 1)
        return transform_dense(counts), ranks

    def raw_ids(self, ranks: np.ndarray) -> np.ndarray:
        """Ranks [n, 26] -> raw IDs [n, 26] int64: a fixed bijective hash per feature (half are negative)."""
        return splitmix64(ranks.astype(np.uint64) + self.id_salts).view(np.int64)

    def logits(self, dense: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """The oracle logit of every task, [n, T] float64."""
        out = np.empty((len(dense), self.num_tasks))
        for task in range(self.num_tasks):
            parts = self._parts(task, dense, ranks, click_logit=out[:, 0] if task else None)
            out[:, task] = self._combine(task, parts) + self.bias[task]
        return out

    def labels(self, rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
        """Bernoulli draws [n, T] float32; tasks after the first can only be 1 where task 0 is 1."""
        labels = (rng.random(logits.shape) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        labels[:, 1:] *= labels[:, :1]
        return labels

    def _parts(self, task: int, dense: np.ndarray, ranks: np.ndarray,
               click_logit: np.ndarray | None = None) -> dict[str, np.ndarray]:
        parts = {"linear": sum(w[ranks[:, f]] for f, w in enumerate(self.linear[task])),
                 "dense": dense @ self.dense_weights[task]}
        if task == 0:
            vectors = [v[ranks[:, f]] for v, f in zip(self.factors, FM_FEATURES)]  # each [n, FM_RANK]
            total = sum(vectors)
            parts["fm"] = 0.5 * ((total**2).sum(1) - sum((v**2).sum(1) for v in vectors))
            parts["dense_sparse"] = sum((dense[:, d] - self.dense_center[d]) * w[ranks[:, f]]
                                        for w, (d, f) in zip(self.pair_weights, DENSE_SPARSE_PAIRS))
        elif click_logit is not None:
            parts["click"] = click_logit
        else:  # pilot: stand in with task 0's logit on the same rows
            parts["click"] = self._combine(0, self._parts(0, dense, ranks)) + self.bias[0]
        return parts

    def _combine(self, task: int, parts: dict[str, np.ndarray]) -> np.ndarray:
        return sum(self.part_scale[task][name] * part for name, part in parts.items())


def _calibrate(logit: np.ndarray, rate: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == rate, by bisection."""
    low, high = -30.0, 30.0
    for _ in range(60):
        mid = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass
class SynthSummary:
    out_dir: str
    rows: int
    train_rows: int
    eval_rows: int
    seed: int
    tasks: list[str]
    cardinalities: list[int]
    label_rates: dict[str, float]  # mean of each label column over all rows
    files: list[str] = field(default_factory=list)

    @property
    def ctr(self) -> float:
        return self.label_rates[self.tasks[0]]


def write_synthetic(out_dir: str, rows: int, seed: int = 0, cardinality_scale: float = 1e-3,
                    tasks: Sequence[str] = ("click",), eval_fraction: float = 0.1, rows_per_file: int = 1_000_000,
                    row_group_size: int = 16_384) -> SynthSummary:
    """Write `rows` synthetic rows: the last `round(rows * eval_fraction)` to `out_dir/eval/`, the rest to
    `out_dir/train/`, plus `out_dir/meta.json`. The same arguments give the same bytes of data."""
    tasks = list(tasks)
    if rows < 1:
        raise DataArgumentError(f"rows must be >= 1, got {rows}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataArgumentError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if cardinality_scale <= 0:
        raise DataArgumentError(f"cardinality_scale must be > 0, got {cardinality_scale}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise DataArgumentError(f"tasks must be distinct names, at least one, got {tasks}")
    try:
        schema = arrow_schema(tasks[1:])
    except ValueError as error:
        raise DataArgumentError(str(error)) from None
    cardinalities = cardinalities_for(cardinality_scale)
    model = HiddenModel(seed, cardinalities, len(tasks))
    eval_rows = round(rows * eval_fraction)
    label_sums = np.zeros(len(tasks))
    with split_writers(out_dir, schema, rows_per_file, row_group_size) as writers, \
            tqdm(total=rows, unit="rows", desc="synth", disable=None) as progress:
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1, chunk])))
            n = min(CHUNK_ROWS, rows - start)
            dense, ranks = model.draw(rng, n)
            labels = model.labels(rng, model.logits(dense, ranks))
            label_sums += labels.sum(axis=0)
            table = pa.Table.from_arrays([*labels.T, *dense.T, *model.raw_ids(ranks).T], schema=schema)
            cut = max(0, min(n, rows - eval_rows - start))
            writers["train"].write(table.slice(0, cut))
            writers["eval"].write(table.slice(cut))
            progress.update(n)
    summary = SynthSummary(out_dir=out_dir, rows=rows, train_rows=rows - eval_rows, eval_rows=eval_rows, seed=seed,
                           tasks=tasks, cardinalities=cardinalities,
                           label_rates={task: float(s / rows) for task, s in zip(tasks, label_sums)},
                           files=writers["train"].files + writers["eval"].files)
    meta = {key: value for key, value in asdict(summary).items() if key not in ("out_dir", "files")}
    meta.update(ctr=summary.ctr, cardinality_scale=cardinality_scale, zipf_exponent=ZIPF_EXPONENT,
                label_columns=[label_column(i, t) for i, t in enumerate(tasks)],
                cardinalities=dict(zip(SPARSE_COLUMNS, cardinalities)))
    write_meta(out_dir, meta)
    return summary
