"""The training-ready copy of a parquet file: fixed-width columns, so that a batch is a few positional reads.

`<split>/part-00000.parquet` gets `<split>/_columns/part-00000.bin` (under the user's cache directory instead
when the data directory is read-only): labels float32 [R, T], then dense float32 [R, 13], then sparse int64
[R, 26], each row-major, so rows [a, b) of a section are one contiguous byte range; and `part-00000.json`: the
source's size and mtime, the row-group sizes, the label columns, the section offsets and a CRC32 per 64 MiB.

`open_columns(path)` builds the copy on first use through the parquet reader's own decoder and checks, under a
file lock (the workers of a node build it once), and checks it on every open: a truncated or damaged copy is
named in one warning line and rebuilt; a copy whose source changed is rebuilt.

>>> columns = open_columns("/data/criteo/train/part-00000.parquet")
>>> columns.read_into("sparse", 0, 4096, np.empty((4096, 26), np.int64))
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from terarec.core.data.errors import BadDataError
from terarec.core.data.parquet import decode_row_group, open_parquet
from terarec.core.data.schema import NUM_DENSE, NUM_SPARSE, check_schema, label_columns_of

FORMAT_VERSION = 1
SECTIONS = ("labels", "dense", "sparse")
CHECKSUM_CHUNK = 64 << 20
ALIGN = 4096
log = logging.getLogger(__name__)
_checked_here: dict[str, tuple[int, int]] = {}  # copy -> (size, mtime_ns) when this process last checked it whole


@dataclass
class ColumnFile:
    """An open column copy: `read_into` fills arrays with rows of one section (thread-safe: positional reads)."""

    path: str
    rows: int
    label_columns: list[str]
    group_rows: list[int]
    offsets: dict[str, int]
    fd: int

    @property
    def row_bytes(self) -> dict[str, int]:
        return section_row_bytes(len(self.label_columns))

    def read_into(self, section: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of `section` into `out`, a C-contiguous array of hi - lo rows of that section."""
        view = memoryview(out).cast("B")
        width = self.row_bytes[section]
        if len(view) != (hi - lo) * width:
            raise ValueError(f"out holds {len(view)} bytes; rows [{lo}, {hi}) of {section} are {(hi - lo) * width}")
        offset = self.offsets[section] + lo * width
        while len(view):
            count = os.preadv(self.fd, [view], offset)
            if count == 0:
                raise BadDataError(f"{self.path} ended at byte {offset} while reading; it was truncated after it was "
                                   f"checked: delete it and run again to rebuild it")
            view, offset = view[count:], offset + count

    def close(self) -> None:
        os.close(self.fd)


def section_row_bytes(num_labels: int) -> dict[str, int]:
    return {"labels": 4 * num_labels, "dense": 4 * NUM_DENSE, "sparse": 8 * NUM_SPARSE}


def open_columns(parquet_path: str, threads: int = 1) -> ColumnFile:
    """The checked column copy of a local parquet file, built (or rebuilt) first if needed.

    threads: how many threads checksum the copy.
    """
    bin_path, manifest_path = column_paths(parquet_path)
    with _locked(bin_path + ".lock"):
        manifest = _checked_manifest(parquet_path, bin_path, manifest_path, threads)
        if manifest is None:
            manifest = _build(parquet_path, bin_path, manifest_path, threads)
    return ColumnFile(bin_path, manifest["rows"], manifest["label_columns"], manifest["group_rows"],
                      manifest["offsets"], os.open(bin_path, os.O_RDONLY))


def open_all_columns(parquet_paths: list[str], threads: int = 1) -> list[ColumnFile]:
    """The column copies of several files, built or checked in parallel over `threads` threads."""
    with ThreadPoolExecutor(max(1, min(threads, len(parquet_paths)))) as pool:
        per_file = max(1, threads // max(1, len(parquet_paths)))
        return list(pool.map(lambda path: open_columns(path, per_file), parquet_paths))


def column_paths(parquet_path: str) -> tuple[str, str]:
    """(.bin, .json) of a parquet file's copy: in `<split>/_columns/`, or the user's cache if that is read-only."""
    split_dir, name = os.path.split(os.path.abspath(parquet_path))
    directory = os.path.join(split_dir, "_columns")
    try:
        os.makedirs(directory, exist_ok=True)
        writable = os.access(directory, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        directory = os.path.join(cache, "terarec", "columns", hashlib.sha1(split_dir.encode()).hexdigest()[:16])
        os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, name.removesuffix(".parquet"))
    return stem + ".bin", stem + ".json"


@contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _source_stamp(parquet_path: str) -> dict:
    stat = os.stat(parquet_path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _checked_manifest(parquet_path: str, bin_path: str, manifest_path: str, threads: int) -> dict | None:
    """The manifest of a sound, current copy; None when there is none yet, it is stale, or it is damaged (warned)."""
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path) as stream:
            manifest = json.load(stream)
        expected_size, sums = manifest["size"], manifest["checksums"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning(f"{manifest_path} is damaged (not a column manifest); rebuilding the copy of {parquet_path}")
        return None
    if manifest.get("version") != FORMAT_VERSION or manifest.get("source") != _source_stamp(parquet_path):
        return None  # written by another version, or the parquet file changed since: rebuild quietly
    size = os.path.getsize(bin_path) if os.path.exists(bin_path) else 0
    if size != expected_size:
        log.warning(f"{bin_path} is truncated or resized ({size} of {expected_size} bytes); rebuilding it from "
                    f"{parquet_path}")
        return None
    stamp = (size, os.stat(bin_path).st_mtime_ns)
    if _checked_here.get(bin_path) == stamp:
        return manifest
    actual = _checksums(bin_path, size, threads)
    if actual != sums:
        chunk = next(i for i, (a, b) in enumerate(zip(actual, sums)) if a != b)
        log.warning(f"{bin_path} is damaged (checksum of bytes {chunk * CHECKSUM_CHUNK}-"
                    f"{min(size, (chunk + 1) * CHECKSUM_CHUNK)} differs); rebuilding it from {parquet_path}")
        return None
    _checked_here[bin_path] = stamp
    return manifest


def _checksums(path: str, size: int, threads: int) -> list[int]:
    """CRC32 of each CHECKSUM_CHUNK bytes of the file (zlib and pread release the GIL: chunks run in parallel)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        def crc(start: int) -> int:
            return zlib.crc32(os.pread(fd, min(CHECKSUM_CHUNK, size - start), start))

        with ThreadPoolExecutor(max(1, threads)) as pool:
            return list(pool.map(crc, range(0, size, CHECKSUM_CHUNK)))
    finally:
        os.close(fd)


def _build(parquet_path: str, bin_path: str, manifest_path: str, threads: int) -> dict:
    """Decode every row group (validated as the parquet reader validates them) into a new copy and its manifest."""
    parquet = open_parquet(parquet_path)
    check_schema(parquet.schema_arrow, parquet_path)
    label_columns = label_columns_of(parquet.schema_arrow)
    group_rows = [parquet.metadata.row_group(group).num_rows for group in range(parquet.metadata.num_row_groups)]
    rows = sum(group_rows)
    row_bytes = section_row_bytes(len(label_columns))
    offsets, size = {}, 0
    for section in SECTIONS:
        offsets[section] = size
        size += -(-rows * row_bytes[section] // ALIGN) * ALIGN
    temporary = f"{bin_path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as stream:
            stream.truncate(size)
            first = 0
            for group, count in enumerate(group_rows):
                dense, sparse, labels = decode_row_group(parquet, parquet_path, group, label_columns)
                for section, array in zip(SECTIONS, (labels, dense, sparse)):
                    os.pwrite(stream.fileno(), np.ascontiguousarray(array), offsets[section] + first * row_bytes[section])
                first += count
        manifest = {"version": FORMAT_VERSION, "source": _source_stamp(parquet_path), "rows": rows,
                    "label_columns": label_columns, "group_rows": group_rows, "offsets": offsets, "size": size,
                    "checksums": _checksums(temporary, size, threads)}
        os.replace(temporary, bin_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    with open(manifest_path + ".tmp", "w") as stream:
        json.dump(manifest, stream)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest
