"""The Criteo parquet layout, defined once: column names and types, the raw-ID hash, and the split writer.

A terarec data directory holds `train/part-00000.parquet, ...` and `eval/part-*.parquet`, each with
the columns

- `label` (float32, 0 or 1): the first task (click);
- `label_<task>` (float32, 0 or 1), optional: further tasks of multi-task data, e.g. `label_conversion`;
- `I1..I13` (float32): dense features, stored already transformed as `log(1 + max(x, 0))` of the raw
  integer count (the TSV converter applies the transform; synthetic data is written transformed);
- `C1..C26` (int64): categorical features as raw 64-bit IDs (any value, negative ones included).

Raw IDs from hex strings and eval-split decisions use `splitmix64` (terarec.kernels.hashing), a fixed
bijective 64-bit mix, so they are the same on every run and machine.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from terarec.core.data.errors import DataArgumentError, OutputExistsError, SchemaMismatchError

LABEL = "label"
DENSE_COLUMNS = [f"I{i}" for i in range(1, 14)]
SPARSE_COLUMNS = [f"C{i}" for i in range(1, 27)]
NUM_DENSE, NUM_SPARSE = len(DENSE_COLUMNS), len(SPARSE_COLUMNS)
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def label_column(task_index: int, task: str) -> str:
    """Task 0 is stored as `label`; task i > 0 as `label_<name>`."""
    return LABEL if task_index == 0 else f"{LABEL}_{task}"


def arrow_schema(extra_tasks: Sequence[str] = ()) -> pa.Schema:
    """The parquet schema: `label`, one `label_<task>` per extra task, I1..I13 float32, C1..C26 int64."""
    for task in extra_tasks:
        if not TASK_NAME.match(task):
            raise ValueError(f"task name {task!r} must be lowercase letters, digits and '_', starting with a letter")
    fields = [pa.field(LABEL, pa.float32())]
    fields += [pa.field(f"{LABEL}_{task}", pa.float32()) for task in extra_tasks]
    fields += [pa.field(name, pa.float32()) for name in DENSE_COLUMNS]
    fields += [pa.field(name, pa.int64()) for name in SPARSE_COLUMNS]
    return pa.schema(fields)


def label_columns_of(schema: pa.Schema) -> list[str]:
    """The label columns present in a file, `label` first, then `label_<task>` in file order."""
    extra = [name for name in schema.names if name.startswith(LABEL + "_")]
    return ([LABEL] if LABEL in schema.names else []) + extra


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise SchemaMismatchError naming `where` and the first missing or mistyped Criteo column."""
    expected = arrow_schema([name[len(LABEL) + 1:] for name in label_columns_of(schema)[1:]])
    for field in expected:
        if field.name not in schema.names:
            raise SchemaMismatchError(f"{where} has no column {field.name!r}; a terarec parquet file needs "
                                      f"{LABEL}, I1..I13 and C1..C26 (write it with `terarec data convert`)")
        actual = schema.field(field.name).type
        if actual != field.type:
            raise SchemaMismatchError(f"{where}: column {field.name!r} is {actual}, expected {field.type}; "
                                      f"rewrite the file with `terarec data convert`")


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """Raw integer counts -> the stored dense value `log(1 + max(x, 0))` as float32."""
    return np.log1p(np.maximum(np.asarray(raw, dtype=np.float64), 0.0)).astype(np.float32)


DENSE_TRANSFORM = "log1p(max(x, 0))"  # what transform_dense does, as data meta.json states it


def write_meta(out_dir: str, meta: dict) -> None:
    """`out_dir/meta.json`: how the data was made, with the dense transform stated (checkpoints state it too,
    and serving applies the same `transform_dense` to raw counts)."""
    with open(os.path.join(out_dir, "meta.json"), "w") as stream:
        json.dump({**meta, "dense_transform": DENSE_TRANSFORM}, stream, indent=2)


def read_data_meta(data_dir: str) -> dict:
    """`data_dir/meta.json` as written by `terarec data synth/convert`; {} where there is none or it is not JSON
    (data written by other tools, or a remote URI: defaults then fall back to what needs no meta)."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as stream:
            meta = json.load(stream)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


class SplitWriter:
    """Writes one split (`<out_dir>/<split>/part-NNNNN.parquet`) in row groups of `row_group_size` rows,
    starting a new file every `rows_per_file` rows. Refuses a directory that already holds parquet files;
    `abort()` removes what it wrote."""

    def __init__(self, out_dir: str, split: str, schema: pa.Schema, rows_per_file: int, row_group_size: int):
        if rows_per_file < 1 or row_group_size < 1:
            raise ValueError(f"rows_per_file ({rows_per_file}) and row_group_size ({row_group_size}) must be >= 1")
        self.directory = os.path.join(out_dir, split)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:  # out_dir is a file, or not writable
            raise DataArgumentError(f"cannot make the output directory {self.directory}: {error.strerror}; "
                                    f"give a new or empty directory") from None
        if any(name.endswith(".parquet") for name in os.listdir(self.directory)):
            raise OutputExistsError(f"{self.directory} already holds parquet files; write into an empty "
                                    f"directory or delete them first")
        self.schema, self.rows_per_file, self.row_group_size = schema, rows_per_file, row_group_size
        self.files: list[str] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_size:
            self._flush(self.row_group_size)

    def close(self) -> None:
        while self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for path in self.files:
            os.remove(path)
        self.files, self.rows = [], 0

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending)
        n = min(n, self.rows_per_file - self._file_rows)
        if self._writer is None:
            path = os.path.join(self.directory, f"part-{len(self.files):05d}.parquet")
            self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.files.append(path)
        self._writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.rows += n
        self._file_rows += n
        if self._file_rows == self.rows_per_file:
            self._writer.close()
            self._writer, self._file_rows = None, 0


@contextmanager
def split_writers(out_dir: str, schema: pa.Schema, rows_per_file: int,
                  row_group_size: int) -> Iterator[dict[str, SplitWriter]]:
    """Writers for `train` and `eval`: closed when the block ends, their files removed if it raises."""
    writers = {split: SplitWriter(out_dir, split, schema, rows_per_file, row_group_size) for split in ("train", "eval")}
    try:
        yield writers
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
