"""Predict request bodies read into arrays: JSON (`PredictRequest`) or an Arrow IPC stream of the Criteo columns.

JSON is validated by pydantic straight from the bytes (its Rust parser; FastAPI's declared-body path builds
Python objects with `json.loads` first and validates those, several times slower for a 256-row body); its errors
are FastAPI's (422, `body.rows.0.dense` ...). An Arrow body (`Content-Type: application/vnd.apache.arrow.stream`)
carries the columns of terarec's parquet data, I1..I13 numeric and C1..C26 integer (other columns, e.g. labels,
are ignored), read column by column without a per-value Python step; its scores come back as an Arrow stream too.
`predict_reply` is the whole predict route past the token check, for the control plane and a replica's own ingress.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
import pyarrow as pa
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS, transform_dense

from .errors import TooLarge, Unprocessable
from .responses import AsciiJSONResponse
from .schemas import PredictRequest

ARROW = "application/vnd.apache.arrow.stream"

Scorer = Callable[[np.ndarray, np.ndarray], Awaitable[np.ndarray]]  # model inputs -> [n, T] probabilities


async def predict_reply(name: str, request: Request, transformed: bool, max_rows: int, scorer: Scorer) -> Response:
    """The reply to POST /v1/models/NAME/predict: the body read as its content type says, checked and transformed
    (`model_inputs`), scored by `scorer`, answered as JSON or, for an Arrow body, an Arrow stream."""
    body = await request.body()
    if is_arrow(request.headers.get("content-type")):
        dense, sparse = read_arrow(body)
        return Response(arrow_scores(await scorer(*model_inputs(dense, sparse, transformed, max_rows))),
                        media_type=ARROW)
    dense, sparse, transformed = read_json(body)
    scores = await scorer(*model_inputs(dense, sparse, transformed, max_rows))
    # the scores are plain floats: a response sent as it is, without validating it again
    return AsciiJSONResponse({"model": name, "scores": scores.tolist()})


def model_inputs(dense: np.ndarray, sparse: np.ndarray, transformed: bool, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A body's rows -> dense [n, 13] float32 (transformed as in training) and sparse [n, 26] int64; at most
    `max_rows` rows, every dense value finite."""
    if len(dense) > max_rows:
        raise TooLarge(f"{len(dense)} rows in one request; at most {max_rows} (TERAREC_MAX_PREDICT_ROWS)")
    with np.errstate(over="ignore"):
        dense = dense.astype(np.float32) if transformed else transform_dense(dense)
    bad = np.argwhere(~np.isfinite(dense))
    if len(bad):
        row, column = bad[0]
        raise Unprocessable(f"rows.{row}.dense.{column}: not finite as float32 (transformed values must stay "
                            "within ±3.4e38)")
    return dense, sparse


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
    types = dict(zip(table.schema.names, table.schema.types))
    missing = [name for name in DENSE_COLUMNS + SPARSE_COLUMNS if name not in types]
    if missing:
        raise Unprocessable(f"body: the Arrow stream lacks the column(s) {', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''}: send I1..I13 and C1..C26")
    if table.num_rows == 0:
        raise Unprocessable("body: the Arrow stream has no rows")
    for names, typed, kind in ((DENSE_COLUMNS, _is_number, "numbers"), (SPARSE_COLUMNS, pa.types.is_integer, "integers")):
        for name in names:
            if not typed(types[name]):
                raise Unprocessable(f"body: column {name} is {types[name]}; send {kind}")
            if table.column(name).null_count:
                raise Unprocessable(f"body: column {name} has {table.column(name).null_count} null value(s)")
    # numpy conversion column by column, without casting in Arrow (a cast per column costs more than the read)
    dense = np.stack([table.column(name).to_numpy() for name in DENSE_COLUMNS], axis=1).astype(np.float64)
    return dense, np.stack([_ids(name, table.column(name).to_numpy()) for name in SPARSE_COLUMNS], axis=1)


def _is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def _ids(name: str, values: np.ndarray) -> np.ndarray:
    """An integer column as int64; an unsigned one must fit."""
    if values.dtype == np.uint64 and len(values) and values.max() > np.iinfo(np.int64).max:
        raise Unprocessable(f"body: column {name} holds a value out of the signed 64-bit range")
    return values.astype(np.int64, copy=False)


def arrow_scores(scores: np.ndarray) -> bytes:
    """[n, T] probabilities -> an Arrow IPC stream of one column `scores`, T float32 values per row (the tasks in
    the order GET /v1/models/{name} lists them)."""
    values = pa.array(np.ascontiguousarray(scores, dtype=np.float32).reshape(-1))
    table = pa.table({"scores": pa.FixedSizeListArray.from_arrays(values, scores.shape[1])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
