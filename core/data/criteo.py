"""Convert a Criteo TSV file (label, I1..I13 integers, C1..C26 hex strings) into terarec parquet, streaming.

Parsing rules:

- A line has exactly 40 tab-separated fields; the label is `0` or `1`; a dense field is a (possibly
  negative) integer of at most 18 digits, empty meaning 0; it is stored as `log(1 + max(x, 0))`.
- A categorical field is a hex string of at most 16 digits; its raw ID is `splitmix64(int(hex, 16))` as int64
  (stable across runs and machines). An empty categorical gets `MISSING_ID = splitmix64(2**64 - 1)`, the
  ID the hex string `ffffffffffffffff` would get (Criteo's values have 8 digits, so they never meet it).
- Any other line is malformed: it is counted, the first `MAX_ERRORS` are kept with their line numbers and
  reasons, and it is skipped, or with `strict=True` the conversion stops with `MalformedInputError` naming
  the file and line and removes the files it wrote. Malformed lines are never written.

The eval split is chosen per line, deterministically: line n (1-based) goes to `eval/` when
`splitmix64(n) % 1_000_000 < eval_fraction * 1_000_000`, so the split does not depend on chunking and
needs no second pass. Plain or `.gz` input.
"""
from __future__ import annotations

import gzip
import itertools
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from terarec.core.data.errors import DataArgumentError, DataError, DataNotFoundError, MalformedInputError
from terarec.core.data.schema import (DENSE_COLUMNS, SPARSE_COLUMNS, arrow_schema, split_writers, splitmix64,
                                          transform_dense)

NUM_FIELDS = 1 + len(DENSE_COLUMNS) + len(SPARSE_COLUMNS)
FIELD_WIDTH = 21  # bytes kept per field; any longer field is malformed anyway
MISSING_ID = int(splitmix64(np.uint64(2**64 - 1)).view(np.int64))
MAX_ERRORS = 10
CHUNK_LINES = 65_536
EVAL_BUCKETS = 1_000_000

_NOT_A_DIGIT = 255
_DIGITS = {base: np.full(256, _NOT_A_DIGIT, dtype=np.uint8) for base in (10, 16)}
_DIGITS[10][np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_DIGITS[16][np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_DIGITS[16][np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


class LineError(NamedTuple):
    line: int  # 1-based line number in the input file
    reason: str


@dataclass
class ConvertSummary:
    rows_written: int
    malformed: int
    first_errors: list[LineError]
    train_rows: int = 0
    eval_rows: int = 0
    files: list[str] = field(default_factory=list)


def _parse_unsigned(chars: np.ndarray, lengths: np.ndarray, base: int, max_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned characters [..., width] uint8 with their lengths -> (values uint64, ok bool): digits of
    `base` only, at most `max_digits` of them."""
    digits = _DIGITS[base][chars]
    inside = np.arange(chars.shape[-1]) < lengths[..., None]
    ok = ~((digits == _NOT_A_DIGIT) & inside).any(-1) & (lengths <= max_digits)
    values = np.zeros(lengths.shape, dtype=np.uint64)
    for j in range(min(chars.shape[-1], max_digits)):
        values = np.where(inside[..., j], values * np.uint64(base) + digits[..., j], values)
    return values, ok


def _characters(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-width byte strings -> (uint8 characters [..., longest], lengths)."""
    lengths = np.char.str_len(fields)
    longest = max(1, int(lengths.max(initial=0)))
    return fields.view(np.uint8).reshape(*fields.shape, FIELD_WIDTH)[..., :longest], lengths


def _parse_dense(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 13] byte strings -> (int64 values, ok); empty is 0, a leading '-' negates."""
    chars, lengths = _characters(fields)
    negative = (chars[..., 0] == ord("-")) & (lengths > 1)
    chars = chars.copy()
    chars[..., 0][negative] = ord("0")
    values, ok = _parse_unsigned(chars, lengths, 10, 19)
    ok &= lengths - negative <= 18
    values = values.view(np.int64)
    return np.where(negative, -values, values), ok


def _parse_sparse(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 26] hex byte strings -> (raw IDs int64, ok); empty is MISSING_ID."""
    chars, lengths = _characters(fields)
    values, ok = _parse_unsigned(chars, lengths, 16, 16)
    return np.where(lengths == 0, MISSING_ID, splitmix64(values).view(np.int64)), ok


def _reason(line: bytes) -> str:
    """Why a line is malformed (called only for the few lines whose reasons are kept)."""
    parts = line.split(b"\t")
    if len(parts) != NUM_FIELDS:
        return f"expected {NUM_FIELDS} tab-separated fields, got {len(parts)}"
    if parts[0] not in (b"0", b"1"):
        return f"label must be 0 or 1, got {parts[0][:40]!r}"
    columns = list(zip(DENSE_COLUMNS, parts[1:14])) + list(zip(SPARSE_COLUMNS, parts[14:]))
    for name, value in columns:
        array = np.array([value], dtype=f"S{FIELD_WIDTH}")
        parsed_ok = (_parse_dense if name in DENSE_COLUMNS else _parse_sparse)(array)[1][0]
        if not parsed_ok or len(value) >= FIELD_WIDTH:
            kind = "an integer of at most 18 digits" if name in DENSE_COLUMNS else "a hex string of at most 16 digits"
            return f"{name} must be {kind}, got {value[:40]!r}"
    return "unparseable line"


def convert_tsv(in_path: str, out_dir: str, eval_fraction: float = 0.1, strict: bool = False,
                rows_per_file: int = 1_000_000, row_group_size: int = 16_384) -> ConvertSummary:
    """Convert `in_path` (Criteo TSV, plain or .gz) to `out_dir/{train,eval}/part-*.parquet`."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataArgumentError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if not os.path.isfile(in_path):
        raise DataNotFoundError(f"input file {in_path} does not exist; pass the path of a Criteo TSV file")
    schema = arrow_schema()
    eval_cut = np.uint64(round(eval_fraction * EVAL_BUCKETS))
    malformed, errors = 0, []
    opener = gzip.open if in_path.endswith(".gz") else open
    with split_writers(out_dir, schema, rows_per_file, row_group_size) as writers, opener(in_path, "rb") as source, \
            tqdm(total=os.path.getsize(in_path), unit="B", unit_scale=True, desc="convert", disable=None) as bar:
        for first_line in itertools.count(1, CHUNK_LINES):
            raw = list(itertools.islice(source, CHUNK_LINES))
            if not raw:
                break
            lines = [line.rstrip(b"\r\n") for line in raw]
            numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)
            whole = np.array([line.count(b"\t") == NUM_FIELDS - 1 for line in lines], dtype=bool)
            good = np.zeros(len(lines), dtype=bool)
            if whole.any():
                kept = [line for line, w in zip(lines, whole) if w]
                fields = np.array(b"\t".join(kept).split(b"\t"), dtype=f"S{FIELD_WIDTH}").reshape(-1, NUM_FIELDS)
                dense, dense_ok = _parse_dense(fields[:, 1:14])
                sparse, sparse_ok = _parse_sparse(fields[:, 14:])
                label_ok = (fields[:, 0] == b"0") | (fields[:, 0] == b"1")
                valid = label_ok & dense_ok.all(1) & sparse_ok.all(1) & (np.char.str_len(fields) < FIELD_WIDTH).all(1)
                good[whole] = valid
                rows = np.flatnonzero(valid)
                table = pa.Table.from_arrays(
                    [(fields[rows, 0] == b"1").astype(np.float32), *transform_dense(dense[rows]).T,
                     *sparse[rows].T], schema=schema)
                to_eval = splitmix64(numbers[whole][rows].astype(np.uint64)) % np.uint64(EVAL_BUCKETS) < eval_cut
                writers["train"].write(table.filter(pa.array(~to_eval)))
                writers["eval"].write(table.filter(pa.array(to_eval)))
            bad = np.flatnonzero(~good)
            if len(bad) and strict:
                raise MalformedInputError(
                    f"{in_path}, line {numbers[bad[0]]}: {_reason(lines[bad[0]])}. Fix or remove the line, "
                    f"or convert without --strict to skip malformed lines")
            malformed += len(bad)
            errors += [LineError(int(numbers[i]), _reason(lines[i])) for i in bad[:MAX_ERRORS - len(errors)]]
            bar.update(sum(map(len, raw)))
    summary = ConvertSummary(rows_written=writers["train"].rows + writers["eval"].rows, malformed=malformed,
                             first_errors=errors, train_rows=writers["train"].rows, eval_rows=writers["eval"].rows,
                             files=writers["train"].files + writers["eval"].files)
    if summary.rows_written == 0:
        raise DataError(f"{in_path} holds no valid Criteo line ({malformed} malformed"
                        + (f", first: line {errors[0].line}: {errors[0].reason}" if errors else "")
                        + "); check that it is the tab-separated Criteo format: label, 13 integers, 26 hex strings")
    return summary
