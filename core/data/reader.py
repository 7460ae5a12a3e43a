"""Read terarec data as one deterministic stream of global batches, each worker taking its slice, fast.

The stream is defined independently of the world size: the row groups of all files, in file order (or
permuted per epoch by (seed, epoch) when shuffling: row-group order only), rows concatenated, cut into global
batches of `global_batch_size` rows. Worker `rank` of `world_size` gets rows
`[rank * n // W, (rank + 1) * n // W)` of each global batch of n rows, so the workers' slices, concatenated
in rank order, are the global batch for any W. A worker reads only the row groups its slices touch.

Local files are read from their training-ready column copy (`columns.py`, built on first use): a batch is a
few positional reads, done by a pool of threads (they release the GIL), several batches ahead, straight into
a ring of pinned buffers; on a CUDA device each batch is copied on a side stream that overlaps the step, and
the step's stream waits only for its own batch. URIs (s3://, ...) are decoded from parquet, one thread.

>>> with BatchReader(list_split_files("/data/criteo", "train"), 65536, rank=0, world_size=8, epochs=1) as reader:
...     for batch in reader:  # Batch(dense [8192, 13], sparse [8192, 26], labels [8192, T])
...         ...
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from terarec.models.batch import Batch
from terarec.core.data.columns import ColumnFile, open_all_columns
from terarec.core.data.errors import DataArgumentError, DataNotFoundError, SchemaMismatchError
from terarec.core.data.parquet import decode_row_group, open_parquet
from terarec.core.data.schema import NUM_DENSE, NUM_SPARSE, check_schema, label_columns_of
from terarec.store.snapshot import is_uri

Piece = tuple[int, int, int]  # (row group, first row, end row) within the group


def list_split_files(data_dir: str, split: str) -> list[str]:
    """The parquet files of `data_dir/split`, sorted; `data_dir` is a local path or a pyarrow.fs URI."""
    if is_uri(data_dir):
        scheme = data_dir[:data_dir.index("://") + 3]
        try:
            fs, root = pafs.FileSystem.from_uri(data_dir)
            directory = f"{root.rstrip('/')}/{split}"
            infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        except (OSError, pa.ArrowException) as error:  # an unknown scheme, no such bucket, no network, no access
            raise DataNotFoundError(f"cannot list {data_dir}/{split}: {' '.join(str(error).split())}; check the URI, "
                                    f"the network and the credentials") from None
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


def count_rows(files: Sequence[str]) -> int:
    """Total rows of the files, from parquet metadata only."""
    return sum(open_parquet(path).metadata.num_rows for path in files)


class _PinnedSlot:
    """One reusable pinned batch buffer of the ring; `copied` is the event of the last copy out of it."""

    def __init__(self, rows: int, num_labels: int):
        self.dense = torch.empty((rows, NUM_DENSE), dtype=torch.float32, pin_memory=True)
        self.sparse = torch.empty((rows, NUM_SPARSE), dtype=torch.int64, pin_memory=True)
        self.labels = torch.empty((rows, num_labels), dtype=torch.float32, pin_memory=True)
        self.copied: torch.cuda.Event | None = None

    def take(self, rows: int) -> Batch:
        """The first `rows` rows, once the previous copy out of this slot has finished."""
        if self.copied is not None:
            self.copied.synchronize()
        return Batch(self.dense[:rows], self.sparse[:rows], self.labels[:rows])


class BatchReader:
    """Iterates `Batch`es of this worker's slice of each global batch, read ahead by a thread pool.

    global_batch_size: rows per global batch (divisible by world_size).
    epochs: None loops forever; k stops after k passes.  start_step: skip that many global batches (metadata
    only, nothing is read).  drop_last: False keeps each epoch's last partial batch, split as evenly as
    possible (a worker may get an empty Batch).  threads: reading threads (default: min(8, cores)); give each
    worker of a node its share.  prefetch: batches read ahead (default threads + 2).  pin_memory: None pins
    when CUDA is available.  device: where yielded batches go (None leaves them on the host).  columns: read
    the column copies (default for local files) or decode parquet (False; the only way for URIs).
    """

    def __init__(self, files: Sequence[str], global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, epochs: int | None = None,
                 start_step: int = 0, prefetch: int | None = None, pin_memory: bool | None = None,
                 device: torch.device | str | None = None, threads: int | None = None, columns: bool | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataArgumentError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise DataArgumentError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                                    f"world_size ({world_size})")
        threads = threads or min(8, os.cpu_count() or 1)
        prefetch = prefetch or threads + 2
        if epochs is not None and epochs < 1 or start_step < 0 or prefetch < 1 or threads < 1:
            raise DataArgumentError(f"need epochs None or >= 1, start_step >= 0, prefetch >= 1, threads >= 1; got "
                                    f"epochs={epochs}, start_step={start_step}, prefetch={prefetch}, threads={threads}")
        if not files:
            raise DataNotFoundError("BatchReader got no files; list them with list_split_files(data_dir, split)")
        self.files = list(files)
        local = not any(is_uri(path) for path in self.files)
        if columns and not local:
            raise DataArgumentError("column copies are made of local files only; read URIs with columns=False")
        self.columns = local if columns is None else columns
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.threads, self.prefetch = threads, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device = None if device is None else torch.device(device)
        self._parquet: dict[int, pq.ParquetFile] = {}
        self._groups: list[tuple[int, int, int]] = []  # (file index, row group index, first row in the file)
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
            first = 0
            for group in range(parquet.metadata.num_row_groups):
                self._groups.append((index, group, first))
                group_rows.append(parquet.metadata.row_group(group).num_rows)
                first += group_rows[-1]
        self._group_rows = np.array(group_rows, dtype=np.int64)
        self.num_rows = int(self._group_rows.sum())
        full, rest = divmod(self.num_rows, global_batch_size)
        self.steps_per_epoch = full + (1 if rest and not drop_last else 0)
        if self.steps_per_epoch == 0:
            raise DataArgumentError(f"the {self.num_rows} rows of {len(self.files)} file(s) make no global batch of "
                                    f"{global_batch_size}; use a smaller batch or drop_last=False")
        self._next_step = start_step
        self._end_step = None if epochs is None else epochs * self.steps_per_epoch
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, group order, first row of each)
        self._column_files: list[ColumnFile] = []
        self._pool: ThreadPoolExecutor | None = None
        self._ring: list[_PinnedSlot] = []
        self._copy_stream: torch.cuda.Stream | None = None
        self._pending: deque[tuple[Future, _PinnedSlot | None]] = deque()  # being read, in step order
        self._ready: deque[tuple[Batch, torch.cuda.Event | None]] = deque()  # on their way to the device
        self._decoded: dict = {}  # the parquet path's last decoded row group
        self._done = False

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        self._start()
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        self._start()
        on_cuda = self.device is not None and self.device.type == "cuda"
        try:
            while len(self._ready) < (2 if on_cuda else 1) and self._pending:  # on CUDA: one copy ahead
                future, slot = self._pending.popleft()
                self._ready.append(self._to_device(future.result(), slot))
                self._submit()
        except BaseException:
            self.close()
            raise
        if not self._ready:
            self._done = True
            raise StopIteration
        batch, copied = self._ready.popleft()
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        return batch

    def close(self) -> None:
        """Stop reading ahead and close the files."""
        self._done = True
        for future, _ in self._pending:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._ready.clear()
        for column_file in self._column_files:
            column_file.close()
        self._column_files = []
        self._parquet.clear()

    def __enter__(self) -> "BatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self._pool is not None or self._done:
            return
        if self.columns:
            self._column_files = open_all_columns(self.files, self.threads)
        # the parquet path decodes in order on one thread: consecutive batches share row groups
        self._pool = ThreadPoolExecutor(self.threads if self.columns else 1, thread_name_prefix="terarec-reader")
        if self.columns and self.device is not None and self.device.type == "cuda":
            rows = self.global_batch_size // self.world_size
            self._ring = [_PinnedSlot(rows, len(self.label_columns)) for _ in range(self.prefetch)]
        if self.device is not None and self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
        self._submit()

    def _submit(self) -> None:
        """Keep `prefetch` batches being read. The ring has `prefetch` slots, so a slot is handed out again only
        after the batch before in it was taken and its copy issued."""
        while len(self._pending) < self.prefetch and (self._end_step is None or self._next_step < self._end_step):
            step = self._next_step
            pieces, rows = self._pieces(step)
            slot = self._ring[step % len(self._ring)] if self._ring else None
            read = self._read_columns if self.columns else self._decode_parquet
            self._pending.append((self._pool.submit(read, pieces, rows, slot), slot))
            self._next_step += 1

    def _to_device(self, batch: Batch, slot: _PinnedSlot | None) -> tuple[Batch, torch.cuda.Event | None]:
        if self.device is None:
            return batch, None
        if self.device.type != "cuda":
            return batch.to(self.device), None
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        for tensor in (moved.dense, moved.sparse, moved.labels):  # allocated on the copy stream, used on the step's
            tensor.record_stream(torch.cuda.current_stream(self.device))
        if slot is not None:
            slot.copied = copied
        moved.ready = copied
        return moved, copied

    # ---- the stream -------------------------------------------------------------------------------
    def _pieces(self, step: int) -> tuple[list[Piece], int]:
        """This rank's rows of global batch `step`, as pieces of row groups in stream order, and their count."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = self._order(epoch)
            self._epoch = (epoch, order, np.concatenate([[0], np.cumsum(self._group_rows[order])]))
        _, order, starts = self._epoch
        n = min(self.global_batch_size, self.num_rows - k * self.global_batch_size)
        begin = k * self.global_batch_size
        lo, hi = begin + self.rank * n // self.world_size, begin + (self.rank + 1) * n // self.world_size
        pieces, rows = [], hi - lo
        position = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi and starts[position] < hi:
            first, end = max(lo, starts[position]) - starts[position], min(hi, starts[position + 1]) - starts[position]
            pieces.append((int(order[position]), int(first), int(end)))
            position += 1
        return pieces, rows

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._groups))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self._groups))

    def _read_columns(self, pieces: list[Piece], rows: int, slot: _PinnedSlot | None) -> Batch:
        """Positional reads of the pieces, straight into a ring slot (or new, maybe pinned, tensors)."""
        if slot is not None:
            batch = slot.take(rows)
        else:
            def empty(width: int, dtype: torch.dtype) -> torch.Tensor:
                return torch.empty((rows, width), dtype=dtype, pin_memory=self.pin_memory)
            batch = Batch(empty(NUM_DENSE, torch.float32), empty(NUM_SPARSE, torch.int64),
                          empty(len(self.label_columns), torch.float32))
        at = 0
        for group, first, end in pieces:
            index, _, group_start = self._groups[group]
            for section, tensor in (("labels", batch.labels), ("dense", batch.dense), ("sparse", batch.sparse)):
                self._column_files[index].read_into(section, group_start + first, group_start + end,
                                                    tensor[at:at + end - first].numpy())
            at += end - first
        return batch

    def _decode_parquet(self, pieces: list[Piece], rows: int, slot: None) -> Batch:
        """Decode the pieces' row groups (keeping the last one: the next batch starts in it) and cut them."""
        parts = []
        for group, first, end in pieces:
            if self._decoded.get("group") != group:
                index, row_group, _ = self._groups[group]
                self._decoded = {"group": group, "arrays": decode_row_group(self._file(index), self.files[index],
                                                                            row_group, self.label_columns)}
            parts.append([array[first:end] for array in self._decoded["arrays"]])
        if not parts:
            parts = [[np.zeros((0, NUM_DENSE), np.float32), np.zeros((0, NUM_SPARSE), np.int64),
                      np.zeros((0, len(self.label_columns)), np.float32)]]
        dense, sparse, labels = (torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*parts))
        batch = Batch(dense, sparse, labels)
        return batch.pin_memory() if self.pin_memory else batch

    def _file(self, index: int) -> pq.ParquetFile:
        if index not in self._parquet:
            self._parquet[index] = open_parquet(self.files[index])
        return self._parquet[index]
