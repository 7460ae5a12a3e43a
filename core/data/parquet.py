"""Open terarec parquet files and decode one row group into validated arrays: the one place that reads parquet.

Both the parquet reader and the builder of the training-ready column copy (`columns.py`) decode through here, so
both reject the same bad data with the same messages.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from terarec.core.data.errors import BadDataError, DataNotFoundError
from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS
from terarec.store.snapshot import is_uri, resolve_uri


def open_parquet(path: str) -> pq.ParquetFile:
    """A local path or a pyarrow.fs URI, opened; a missing or unreadable file is a DataError naming it."""
    try:
        if is_uri(path):
            fs, inner = resolve_uri(path)
            return pq.ParquetFile(fs.open_input_file(inner))
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} does not exist; list the files again with list_split_files") from None
    except (OSError, pa.ArrowException) as error:
        raise BadDataError(f"{path} is not a readable parquet file ({error}); re-create or remove it") from None


def decode_row_group(parquet: pq.ParquetFile, path: str, row_group: int,
                     label_columns: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row group -> dense [R, 13] float32, sparse [R, 26] int64, labels [R, T] float32, validated."""
    where = f"{path}, row group {row_group}"
    columns = label_columns + DENSE_COLUMNS + SPARSE_COLUMNS
    try:
        table = parquet.read_row_group(row_group, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise BadDataError(f"cannot decode {where} ({error}); the file is corrupt: re-create or remove it") from None
    for name in columns:
        if table.column(name).null_count:
            raise BadDataError(f"{where}: column {name} has null values; re-create the file with "
                               f"`terarec data convert`")

    def stack(names: list[str], dtype) -> np.ndarray:
        return np.stack([table.column(name).to_numpy() for name in names], axis=1).astype(dtype, copy=False)

    dense, sparse = stack(DENSE_COLUMNS, np.float32), stack(SPARSE_COLUMNS, np.int64)
    labels = stack(label_columns, np.float32)
    nan_rows, nan_columns = np.nonzero(np.isnan(dense))
    if len(nan_rows):
        raise BadDataError(f"{where}: column {DENSE_COLUMNS[nan_columns[0]]} is NaN in row {nan_rows[0]} of the "
                           f"row group; training must not see NaN: fix or drop these rows and rewrite the file")
    if ((labels != 0) & (labels != 1)).any():
        raise BadDataError(f"{where}: labels must be 0 or 1; fix the label columns and rewrite the file")
    return dense, sparse, labels
