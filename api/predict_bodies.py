"""Predict request bodies read into arrays: JSON (`PredictRequest`) or an Arrow IPC stream of the Criteo columns.

JSON is validated by pydantic straight from the bytes (its Rust parser; FastAPI's declared-body path builds
Python objects with `json.loads` first and validates those, several times slower for a 256-row body); its errors
are FastAPI's (422, `body.rows.0.dense` ...). An Arrow body (`Content-Type: application/vnd.apache.arrow.stream`)
carries the columns of terarec's parquet data, I1..I13 numeric and C1..C26 integer (other columns, e.g. labels,
are ignored), read column by column without a per-value Python step; its scores come back as an Arrow stream too.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS

from .errors import Unprocessable
from .schemas import PredictRequest

ARROW = "application/vnd.apache.arrow.stream"


def is_arrow(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == ARROW


def read_json(body: bytes) -> tuple[np.ndarray, np.ndarray, bool]:
    """A JSON body -> dense [n, 13] float64 as sent, sparse [n, 26] int64, and its `transformed` flag."""
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError([problem | {"loc": ("body", *problem["loc"])}
                                      for problem in error.errors(include_url=False, include_input=False)]) from None
    return (np.asarray([row.dense for row in request.rows], dtype=np.float64),
            np.asarray([row.sparse for row in request.rows], dtype=np.int64), request.transformed)


def read_arrow(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow IPC stream body -> dense [n, 13] float64 and sparse [n, 26] int64; one line naming what is wrong."""
    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowException, OSError):
        raise Unprocessable(f"body: not an Arrow IPC stream (Content-Type {ARROW}: write the table with "
                            "pyarrow.ipc.new_stream)") from None
    missing = [name for name in DENSE_COLUMNS + SPARSE_COLUMNS if name not in table.column_names]
    if missing:
        raise Unprocessable(f"body: the Arrow stream lacks the column(s) {', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''}: send I1..I13 and C1..C26")
    if table.num_rows == 0:
        raise Unprocessable("body: the Arrow stream has no rows")
    return (np.stack([_column(table, name, pa.types.is_integer(table.schema.field(name).type)
                              or pa.types.is_floating(table.schema.field(name).type), pa.float64())
                      for name in DENSE_COLUMNS], axis=1),
            np.stack([_column(table, name, pa.types.is_integer(table.schema.field(name).type), pa.int64())
                      for name in SPARSE_COLUMNS], axis=1))


def _column(table: pa.Table, name: str, typed: bool, to: pa.DataType) -> np.ndarray:
    column = table.column(name)
    if not typed:
        raise Unprocessable(f"body: column {name} is {column.type}; send {'integers' if to == pa.int64() else 'numbers'}")
    if column.null_count:
        raise Unprocessable(f"body: column {name} has {column.null_count} null value(s)")
    try:
        return column.cast(to).to_numpy()
    except pa.ArrowInvalid:  # an unsigned ID beyond int64
        raise Unprocessable(f"body: column {name} holds a value out of the signed 64-bit range") from None


def arrow_scores(scores: np.ndarray) -> bytes:
    """[n, T] probabilities -> an Arrow IPC stream of one column `scores`, T float32 values per row (the tasks in
    the order GET /v1/models/{name} lists them)."""
    values = pa.array(np.ascontiguousarray(scores, dtype=np.float32).reshape(-1))
    table = pa.table({"scores": pa.FixedSizeListArray.from_arrays(values, scores.shape[1])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
