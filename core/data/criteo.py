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

Inputs: one or more files or globs (Criteo's day_0 ... day_23), plain or `.gz`, read in natural order
(day_2 before day_10); line n counts across all of them (1-based). The eval split is chosen per line:
- `hash` (default): line n goes to `eval/` when `splitmix64(n) % 1_000_000 < eval_fraction * 1_000_000`
  (deterministic, independent of chunking, no extra pass);
- `tail`: the last `round(eval_fraction * lines)` lines, malformed ones counted (a first pass counts lines);
- `eval_from=FILE`: that input file and the ones after it (time order, as Criteo's last day).
Rare IDs (`min_count` N > 1): a first pass counts each feature's IDs over the training lines (exactly,
`IdCounts`); IDs seen fewer than N times are written as `OOV_ID`, so each feature has one out-of-vocabulary
key. `meta.json` records the inputs, the split, min_count and the dense transform.
"""
from __future__ import annotations

import glob
import gzip
import itertools
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from terarec.core.data.errors import DataArgumentError, DataError, DataNotFoundError, MalformedInputError
from terarec.core.data.schema import (DENSE_COLUMNS, SPARSE_COLUMNS, arrow_schema, split_writers, transform_dense,
                                     write_meta)
from terarec.kernels.hashing import splitmix64_uint64 as splitmix64

NUM_FIELDS = 1 + len(DENSE_COLUMNS) + len(SPARSE_COLUMNS)
FIELD_WIDTH = 21  # bytes kept per field; any longer field is malformed anyway
MISSING_ID = int(splitmix64(np.uint64(2**64 - 1)).view(np.int64))
OOV_ID = int(splitmix64(np.uint64(2**64 - 2)).view(np.int64))  # rare IDs under --min-count (one key per feature)
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
    path: str = ""


@dataclass
class ConvertSummary:
    rows_written: int
    malformed: int
    first_errors: list[LineError]
    train_rows: int = 0
    eval_rows: int = 0
    files: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


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


class IdCounts:
    """Exact counts of each feature's raw IDs, kept as sorted (ids, counts) arrays per feature; chunks are merged
    in every MERGE_CHUNKS chunks (a sort of the running table plus the new IDs), so memory is about 16 bytes
    per distinct (feature, ID) pair."""

    MERGE_CHUNKS = 16

    def __init__(self, num_features: int):
        self.ids = [np.zeros(0, np.int64) for _ in range(num_features)]
        self.counts = [np.zeros(0, np.int64) for _ in range(num_features)]
        self._pending: list[np.ndarray] = []

    def add(self, sparse: np.ndarray) -> None:
        """sparse [n, F] raw IDs."""
        self._pending.append(sparse)
        if len(self._pending) >= self.MERGE_CHUNKS:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        new = np.concatenate(self._pending)
        self._pending = []
        for f in range(new.shape[1]):
            ids, inverse = np.unique(np.concatenate([self.ids[f], new[:, f]]), return_inverse=True)
            weights = np.concatenate([self.counts[f], np.ones(len(new), np.int64)])
            self.ids[f], self.counts[f] = ids, np.bincount(inverse, weights).astype(np.int64)

    def frequent(self, min_count: int) -> list[np.ndarray]:
        """Per feature, the sorted IDs seen at least `min_count` times."""
        self._merge()
        return [ids[counts >= min_count] for ids, counts in zip(self.ids, self.counts)]


def map_rare(sparse: np.ndarray, kept: list[np.ndarray]) -> np.ndarray:
    """sparse [n, F] raw IDs -> the same, with each feature's IDs outside `kept[f]` (sorted) replaced by OOV_ID."""
    out = sparse.copy()
    for f, vocabulary in enumerate(kept):
        column = sparse[:, f]
        at = np.minimum(np.searchsorted(vocabulary, column), max(len(vocabulary) - 1, 0))
        known = vocabulary[at] == column if len(vocabulary) else np.zeros(len(column), bool)
        out[:, f] = np.where(known, column, OOV_ID)
    return out


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
    """Paths and globs -> files in natural order (day_2 before day_10), each once; a pattern matching nothing fails."""
    paths: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matches = sorted(glob.glob(pattern), key=_natural_key) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(path) for path in matches):
            raise DataNotFoundError(f"input {pattern} does not exist or matches no file; pass Criteo TSV files "
                                    f"(plain or .gz) or a glob such as 'day_*.gz'")
        paths += [path for path in matches if path not in paths]
    return paths


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _line_chunks(path: str) -> Iterator[tuple[list[bytes], int]]:
    """(lines without their line ends, bytes read) per CHUNK_LINES lines of a plain or .gz file."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as source:
        try:
            while raw := list(itertools.islice(source, CHUNK_LINES)):
                yield [line.rstrip(b"\r\n") for line in raw], sum(map(len, raw))
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a .gz cut short, or not gzip at all
            raise DataError(f"{path} cannot be read as gzip ({error}); download it again, or give a plain "
                            f"text file a name without .gz") from None


def _parse_lines(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lines -> (valid [n] bool, then for the valid lines in order: labels float32, dense int64 raw, sparse int64)."""
    whole = np.array([line.count(b"\t") == NUM_FIELDS - 1 for line in lines], dtype=bool)
    good = np.zeros(len(lines), dtype=bool)
    if not whole.any():
        return good, np.zeros(0, np.float32), np.zeros((0, 13), np.int64), np.zeros((0, 26), np.int64)
    kept = [line for line, w in zip(lines, whole) if w]
    fields = np.array(b"\t".join(kept).split(b"\t"), dtype=f"S{FIELD_WIDTH}").reshape(-1, NUM_FIELDS)
    dense, dense_ok = _parse_dense(fields[:, 1:14])
    sparse, sparse_ok = _parse_sparse(fields[:, 14:])
    label_ok = (fields[:, 0] == b"0") | (fields[:, 0] == b"1")
    valid = label_ok & dense_ok.all(1) & sparse_ok.all(1) & (np.char.str_len(fields) < FIELD_WIDTH).all(1)
    good[whole] = valid
    return good, (fields[valid, 0] == b"1").astype(np.float32), dense[valid], sparse[valid]


class _EvalSplit:
    """Which lines go to eval/: by a hash of the global line number (`hash`), the last fraction of all lines
    (`tail`), or every line of the file `eval_from` and of the files after it."""

    def __init__(self, paths: list[str], eval_fraction: float, split: str, eval_from: str | None):
        self.split, self.first_eval_file = split, len(paths)
        self.hash_cut = np.uint64(round(eval_fraction * EVAL_BUCKETS))
        if eval_from is not None:
            self.split = "eval_from"
            matches = [i for i, path in enumerate(paths) if os.path.samefile(path, eval_from)] \
                if os.path.isfile(eval_from) else []
            if not matches:
                raise DataArgumentError(f"--eval-from {eval_from} is not one of the input files; name one of them")
            self.first_eval_file = matches[0]
        elif split == "tail":
            total = sum(len(lines) for path in paths for lines, _ in _line_chunks(path))
            self.tail_start = total - round(eval_fraction * total)

    def to_eval(self, file_index: int, line_indexes: np.ndarray) -> np.ndarray:
        """line_indexes: 0-based line numbers across all input files -> bool per line."""
        if self.split == "eval_from":
            return np.full(len(line_indexes), file_index >= self.first_eval_file)
        if self.split == "tail":
            return line_indexes >= self.tail_start
        return splitmix64(line_indexes.astype(np.uint64) + np.uint64(1)) % np.uint64(EVAL_BUCKETS) < self.hash_cut


def convert_tsv(inputs: str | Sequence[str], out_dir: str, eval_fraction: float = 0.1, strict: bool = False,
                rows_per_file: int = 1_000_000, row_group_size: int = 16_384, split: str = "hash",
                eval_from: str | None = None, min_count: int = 1) -> ConvertSummary:
    """Convert Criteo TSV files (paths or globs, plain or .gz, read in natural order) to
    `out_dir/{train,eval}/part-*.parquet` and `out_dir/meta.json`.

    The eval split: `hash` (default) or `tail` (the last `eval_fraction` of all lines), or with `eval_from`
    that file and the ones after it. With `min_count` > 1 a first pass counts each feature's IDs over the
    training lines, and IDs seen fewer times become the feature's one out-of-vocabulary ID, `OOV_ID`.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataArgumentError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if split not in ("hash", "tail"):
        raise DataArgumentError(f"split must be 'hash' or 'tail', got {split!r}")
    if min_count < 1:
        raise DataArgumentError(f"min_count must be >= 1, got {min_count}")
    paths = expand_inputs(inputs)
    evaluation = _EvalSplit(paths, eval_fraction, split, eval_from)
    kept = _frequent_ids(paths, evaluation, min_count) if min_count > 1 else None
    schema = arrow_schema()
    malformed, errors, line_offset = 0, [], 0
    with split_writers(out_dir, schema, rows_per_file, row_group_size) as writers, \
            tqdm(total=sum(map(os.path.getsize, paths)), unit="B", unit_scale=True, desc="convert", disable=None) as bar:
        for file_index, path in enumerate(paths):
            first_line = 1
            for lines, size in _line_chunks(path):
                numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)  # 1-based, in this file
                good, labels, dense, sparse = _parse_lines(lines)
                if kept is not None:
                    sparse = map_rare(sparse, kept)
                table = pa.Table.from_arrays([labels, *transform_dense(dense).T, *sparse.T], schema=schema)
                to_eval = evaluation.to_eval(file_index, numbers[good] - 1 + line_offset)
                writers["train"].write(table.filter(pa.array(~to_eval)))
                writers["eval"].write(table.filter(pa.array(to_eval)))
                bad = np.flatnonzero(~good)
                if len(bad) and strict:
                    raise MalformedInputError(
                        f"{path}, line {numbers[bad[0]]}: {_reason(lines[bad[0]])}. Fix or remove the line, "
                        f"or convert without --strict to skip malformed lines")
                malformed += len(bad)
                errors += [LineError(int(numbers[i]), _reason(lines[i]), path) for i in bad[:MAX_ERRORS - len(errors)]]
                first_line += len(lines)
                bar.update(size)
            line_offset += first_line - 1
    summary = ConvertSummary(rows_written=writers["train"].rows + writers["eval"].rows, malformed=malformed,
                             first_errors=errors, train_rows=writers["train"].rows, eval_rows=writers["eval"].rows,
                             files=writers["train"].files + writers["eval"].files, inputs=paths)
    if summary.rows_written == 0:
        raise DataError(f"{', '.join(paths)} holds no valid Criteo line ({malformed} malformed"
                        + (f", first: line {errors[0].line}: {errors[0].reason}" if errors else "")
                        + "); check that it is the tab-separated Criteo format: label, 13 integers, 26 hex strings")
    write_meta(out_dir, {"source": "criteo_tsv", "inputs": paths, "rows": summary.rows_written,
                         "train_rows": summary.train_rows, "eval_rows": summary.eval_rows, "malformed": malformed,
                         "eval_split": evaluation.split, "eval_fraction": eval_fraction, "eval_from": eval_from,
                         "min_count": min_count, "oov_id": OOV_ID if kept is not None else None,
                         "vocabulary_sizes": [len(ids) for ids in kept] if kept is not None else None})
    return summary


def _frequent_ids(paths: list[str], evaluation: _EvalSplit, min_count: int) -> list[np.ndarray]:
    """The first pass of --min-count: per feature, the sorted IDs seen at least min_count times in training lines."""
    counts, line_offset = IdCounts(len(SPARSE_COLUMNS)), 0
    for file_index, path in enumerate(paths):
        for lines, _ in tqdm(_line_chunks(path), desc=f"count IDs in {os.path.basename(path)}", disable=None):
            good, _, _, sparse = _parse_lines(lines)
            indexes = np.flatnonzero(good) + line_offset
            counts.add(sparse[~evaluation.to_eval(file_index, indexes)])
            line_offset += len(lines)
    return counts.frequent(min_count)
