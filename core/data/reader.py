"""Read terarec parquet data as one deterministic stream of global batches, each worker taking its slice.

The stream is defined independently of the world size: the row groups of all files, in file order (or
permuted per epoch by (seed, epoch) when shuffling: row-group order only), rows concatenated, cut into global
batches of `global_batch_size` rows. Worker `rank` of `world_size` gets rows
`[rank * n // W, (rank + 1) * n // W)` of each global batch of n rows, so the workers' slices, concatenated
in rank order, are the global batch for any W. A worker decodes only the row groups its slices touch.

>>> with BatchReader(list_split_files("/data/criteo", "train"), 65536, rank=0, world_size=8, epochs=1) as reader:
...     for batch in reader:  # Batch(dense [8192, 13], sparse [8192, 26], labels [8192, T])
...         ...
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from terarec.models.batch import Batch
from terarec.core.data.errors import (BadDataError, DataArgumentError, DataNotFoundError,
                                          SchemaMismatchError)
from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS, check_schema, label_columns_of


def list_split_files(data_dir: str, split: str) -> list[str]:
    """The parquet files of `data_dir/split`, sorted; `data_dir` is a local path or a pyarrow.fs URI."""
    if "://" in data_dir:
        scheme = data_dir[:data_dir.index("://") + 3]
        fs, root = pafs.FileSystem.from_uri(data_dir)
        directory = f"{root.rstrip('/')}/{split}"
        infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        files = sorted(scheme + info.path for info in infos if info.is_file and info.path.endswith(".parquet"))
        where = scheme + directory
    else:
        where = os.path.join(data_dir, split)
        names = os.listdir(where) if os.path.isdir(where) else []
        files = sorted(os.path.join(where, name) for name in names if name.endswith(".parquet"))
    if not files:
        raise DataNotFoundError(f"no parquet files in {where}; create the data with `terarec data synth` or "
                                f"`terarec data convert`, or point the data directory elsewhere")
    return files


def _open(path: str) -> pq.ParquetFile:
    try:
        if "://" in path:
            fs, inner = pafs.FileSystem.from_uri(path)
            return pq.ParquetFile(fs.open_input_file(inner))
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} does not exist; list the files again with list_split_files") from None
    except (OSError, pa.ArrowException) as error:
        raise BadDataError(f"{path} is not a readable parquet file ({error}); re-create or remove it") from None


def count_rows(files: Sequence[str]) -> int:
    """Total rows of the files, from parquet metadata only."""
    return sum(_open(path).metadata.num_rows for path in files)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class BatchReader:
    """Iterates `Batch`es of this worker's slice of each global batch, decoded in a background thread.

    global_batch_size: rows per global batch (divisible by world_size).
    epochs: None loops forever; k stops after k passes.  start_step: skip that many global batches (metadata
    only, nothing is decoded).  drop_last: False keeps each epoch's last partial batch, split as evenly as
    possible (a worker may get an empty Batch).  prefetch: batches buffered ahead.  pin_memory: None pins when
    CUDA is available.  device: where yielded batches go (None leaves them on the host).
    """

    def __init__(self, files: Sequence[str], global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, epochs: int | None = None,
                 start_step: int = 0, prefetch: int = 4, pin_memory: bool | None = None,
                 device: torch.device | str | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataArgumentError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise DataArgumentError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                                    f"world_size ({world_size})")
        if epochs is not None and epochs < 1 or start_step < 0 or prefetch < 1:
            raise DataArgumentError(f"need epochs None or >= 1, start_step >= 0, prefetch >= 1; got epochs={epochs}, "
                                    f"start_step={start_step}, prefetch={prefetch}")
        if not files:
            raise DataNotFoundError("BatchReader got no files; list them with list_split_files(data_dir, split)")
        self.files = list(files)
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.seed, self.shuffle, self.epochs, self.start_step = seed, shuffle, epochs, start_step
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device = device
        self._parquet: dict[int, pq.ParquetFile] = {}
        self._groups: list[tuple[int, int]] = []  # (file index, row group index)
        group_rows = []
        for index, path in enumerate(self.files):
            parquet = self._file(index)
            check_schema(parquet.schema_arrow, path)
            labels = label_columns_of(parquet.schema_arrow)
            if index == 0:
                self.label_columns = labels
            elif labels != self.label_columns:
                raise SchemaMismatchError(f"{path} has label columns {labels}, but {self.files[0]} has "
                                          f"{self.label_columns}; read files of one dataset together")
            for group in range(parquet.metadata.num_row_groups):
                self._groups.append((index, group))
                group_rows.append(parquet.metadata.row_group(group).num_rows)
        self._group_rows = np.array(group_rows, dtype=np.int64)
        self.num_rows = int(self._group_rows.sum())
        full, rest = divmod(self.num_rows, global_batch_size)
        self.steps_per_epoch = full + (1 if rest and not drop_last else 0)
        if self.steps_per_epoch == 0:
            raise DataArgumentError(f"the {self.num_rows} rows of {len(self.files)} file(s) make no global batch of "
                                    f"{global_batch_size}; use a smaller batch or drop_last=False")
        self._columns = self.label_columns + DENSE_COLUMNS + SPARSE_COLUMNS
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False

    def __iter__(self) -> Iterator[Batch]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="terarec-batch-reader", daemon=True)
            self._thread.start()
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        iter(self)
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self._done = True
            if item is _END:
                raise StopIteration
            raise item.error
        return item if self.device is None else item.to(self.device, non_blocking=self.pin_memory)

    def close(self) -> None:
        """Stop the background thread and close the files."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None
        self._done = True
        self._parquet.clear()

    def __enter__(self) -> "BatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _produce(self) -> None:
        try:
            step = self.start_step
            starts = None
            while (self.epochs is None or step < self.epochs * self.steps_per_epoch) and not self._stop.is_set():
                epoch, k = divmod(step, self.steps_per_epoch)
                if starts is None or k == 0:
                    order = self._order(epoch)
                    starts = np.concatenate([[0], np.cumsum(self._group_rows[order])])
                    cache: dict = {}
                n = min(self.global_batch_size, self.num_rows - k * self.global_batch_size)
                begin = k * self.global_batch_size
                batch = self._rows(order, starts, cache, begin + self.rank * n // self.world_size,
                                   begin + (self.rank + 1) * n // self.world_size)
                self._put(batch.pin_memory() if self.pin_memory else batch)
                step += 1
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._groups))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self._groups))

    def _rows(self, order: np.ndarray, starts: np.ndarray, cache: dict, lo: int, hi: int) -> Batch:
        """Rows [lo, hi) of the epoch's stream; `cache` keeps the last decoded row group."""
        pieces = []
        position = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi and starts[position] < hi:
            group = int(order[position])
            if cache.get("group") != group:
                cache.clear()
                cache.update(group=group, arrays=self._decode(group))
            first, last = max(lo, starts[position]) - starts[position], min(hi, starts[position + 1]) - starts[position]
            pieces.append([array[first:last] for array in cache["arrays"]])
            position += 1
        if not pieces:
            pieces = [[np.zeros((0, len(DENSE_COLUMNS)), np.float32), np.zeros((0, len(SPARSE_COLUMNS)), np.int64),
                       np.zeros((0, len(self.label_columns)), np.float32)]]
        dense, sparse, labels = (torch.from_numpy(np.concatenate(parts)) for parts in zip(*pieces))
        return Batch(dense, sparse, labels)

    def _file(self, index: int) -> pq.ParquetFile:
        if index not in self._parquet:
            self._parquet[index] = _open(self.files[index])
        return self._parquet[index]

    def _decode(self, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One row group -> dense [R, 13] float32, sparse [R, 26] int64, labels [R, T] float32, validated."""
        index, row_group = self._groups[group]
        where = f"{self.files[index]}, row group {row_group}"
        try:
            table = self._file(index).read_row_group(row_group, columns=self._columns)
        except (OSError, pa.ArrowException) as error:
            raise BadDataError(f"cannot decode {where} ({error}); the file is corrupt: re-create or remove it") from None
        for name in self._columns:
            if table.column(name).null_count:
                raise BadDataError(f"{where}: column {name} has null values; re-create the file with "
                                   f"`terarec data convert`")

        def stack(names: list[str], dtype) -> np.ndarray:
            return np.stack([table.column(name).to_numpy() for name in names], axis=1).astype(dtype, copy=False)

        dense, sparse = stack(DENSE_COLUMNS, np.float32), stack(SPARSE_COLUMNS, np.int64)
        labels = stack(self.label_columns, np.float32)
        nan_rows, nan_columns = np.nonzero(np.isnan(dense))
        if len(nan_rows):
            raise BadDataError(f"{where}: column {DENSE_COLUMNS[nan_columns[0]]} is NaN in row {nan_rows[0]} of the "
                               f"row group; training must not see NaN: fix or drop these rows and rewrite the file")
        if ((labels != 0) & (labels != 1)).any():
            raise BadDataError(f"{where}: labels must be 0 or 1; fix the label columns and rewrite the file")
        return dense, sparse, labels
