"""The SSD table: a persistent table of value rows under one directory, with snapshots.

Layout of `path/`:
  chunk-<c>.g<gen>.bin   `chunk_rows` fixed-width records (value_width float32 each); row r of the table is
                         record r % chunk_rows of chunk r // chunk_rows
  keys-<id>.bin          the keys of snapshot <id>, int64, in slot order (key i owns row i)
  snapshot-<id>.json     a manifest: shape, optimizer, step, and every file of the snapshot with size and CRC-32
  CURRENT                the name of the latest manifest, replaced atomically

A snapshot is a consistent point: `commit` syncs the chunks, writes the keys and a
manifest, then swaps CURRENT. Chunk files named by a snapshot are never changed:
the first write to one afterwards copies it to the next generation
(copy-on-write), so reopening after a crash gives the last snapshot exactly.
Opening checks every file's size and checksum and names the file that fails.
One process writes a table at a time.

I/O. A read sorts its slots and moves the rows in ascending slot order into its
output (pinned memory when `pinned`, so a copy to the GPU needs no staging); slots
that arrive sorted (a prefetch's) land in place, others are put back in the
caller's order with one copy. Three ways to move rows (`io`, bench/ssd_io.py
measures them): `map` maps every chunk file at its place in one reserved range of
addresses (chunk c at c * chunk_bytes), so the whole table is one [rows, W] array
and a read is one native gather (a scatter for a write) per I/O thread, the GIL
released throughout and no Python work per chunk (a page fault is a disk read);
`chunk-maps` maps each chunk on its own and gathers each touched chunk's rows with
one call (Python work per touched chunk; `map` falls back to it, with a log line,
where the range cannot be made: not Linux, or chunks that are not whole pages);
`pread` coalesces runs of adjacent records and moves each run with one
`os.preadv`/`os.pwritev` (no faults, no mapping; but one call, and one trip through
the GIL, per run). Each way splits the work among a pool of READERS threads when
large, so the disk serves a batch's requests together. A write is queued to one
background thread and applied in order, so write-back leaves the caller's critical
path; a read of a slot with a queued write waits for that write, and `commit`
waits for all of them. A copy on write maps the chunk's new file over the old one's
place in the range once the copy is complete: a read beside it sees either file,
and both hold the same rows until the write that follows.
"""
from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .snapshot import file_crc32

FORMAT = "terarec-ssd-table"
VERSION = 1
MAX_QUEUED_WRITES = 4  # a write waits for the oldest queued one beyond this, bounding the memory they hold
READERS = 16  # requests in flight at once: an SSD serves parallel requests far faster
RUNS_PER_READER = 256  # `pread` moves fewer runs on one thread: a hand-off costs more than it saves
ROWS_PER_READER = 256  # `map` gives a thread no fewer rows, for the same reason
IO_MODES = ("map", "chunk-maps", "pread")
RANGE_BYTES = 1 << 36  # the least address space `map` reserves (nothing is allocated); then twice the chunks
CHANGED = -1  # in chunk_crcs: written since the last snapshot, CRC not known
MAP_FIXED, PROT_NONE = 0x10, 0x0  # Linux's values on every architecture; Python's mmap module names neither

log = logging.getLogger(__name__)


class DamagedTableError(ValueError):
    """A file of an SSD table is missing, truncated or fails its checksum."""


def _libc() -> ctypes.CDLL | None:
    """The C library's mmap, munmap and madvise, or None where `map` cannot place maps (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


LIBC = _libc()


class _ChunkRange:
    """Address space reserved for `chunks` chunks of `chunk_bytes`, chunk c's file mapped at c * chunk_bytes, so
    that the table's rows are one array. Unmapped when the last array over it goes (`rows` arrays hold it)."""

    def __init__(self, chunk_bytes: int, chunks: int):
        self.chunk_bytes, self.chunks, self.size = chunk_bytes, chunks, chunk_bytes * chunks
        self.address = None
        address = LIBC.mmap(None, self.size, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"cannot reserve {self.size} bytes of address space for the SSD table")
        self.address = address

    def map(self, chunk: int, fd: int) -> None:
        """Map `fd` (a chunk file) at chunk `chunk`'s place, over whatever was there."""
        at = self.address + chunk * self.chunk_bytes
        if LIBC.mmap(at, self.chunk_bytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED, fd, 0) != at:
            raise OSError(ctypes.get_errno(), f"cannot map chunk {chunk} of the SSD table")
        LIBC.madvise(at, self.chunk_bytes, mmap.MADV_RANDOM)  # no read-ahead of neighbouring, unused pages

    def rows(self, rows: int, width: int) -> np.ndarray:
        """[rows, width] float32 over the first `rows` rows; the array keeps the range mapped."""
        return np.asarray(_Rows(self, rows, width))

    def __del__(self):
        if self.address is not None:
            LIBC.munmap(self.address, self.size)


class _Rows:
    """What numpy makes an array of (`__array_interface__`), holding the range it points into."""

    def __init__(self, chunk_range: _ChunkRange, rows: int, width: int):
        self.chunk_range = chunk_range
        self.__array_interface__ = {"data": (chunk_range.address, False), "shape": (rows, width),
                                    "typestr": "<f4", "version": 3}


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class SsdTable:
    """Rows addressed by slot in chunk files under `path`; `meta` (dim, optimizer…) must match on reopening.

    >>> import tempfile
    >>> table = SsdTable(tempfile.mkdtemp(), value_width=2, meta={"dim": 2}, chunk_rows=4)
    >>> table.reserve(5); table.write(torch.tensor([4]), torch.ones(1, 2))
    >>> table.commit(torch.arange(5), step=1)
    1
    """

    name = "ssd"
    slot_device = torch.device("cpu")  # where read and write take slots and rows without a copy

    def __init__(self, path: str | os.PathLike, value_width: int, meta: dict, chunk_rows: int = 1 << 16,
                 keep: int = 2, verify: bool = True, pinned: bool = False, readers: int = READERS,
                 io: str = "map"):
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.value_width = value_width
        self.row_bytes = value_width * 4
        self.meta = {**meta, "value_width": value_width}
        self.chunk_rows = chunk_rows
        self.keep = keep
        self.pinned = pinned  # rows read land in page-locked memory (they go on to a GPU)
        self.chunks: list = []  # an open file per chunk (raw FileIO: `pread` moves rows through its fd)
        self.maps: list[torch.Tensor | None] = []  # `chunk-maps`: [chunk_rows, W] over a chunk's map, made when first used
        self._range: _ChunkRange | None = None  # `map`: every chunk's map, back to back
        self._rows: np.ndarray | None = None  # `map`: [rows of the chunks so far, W] over the range
        self.retired: list = []  # files of chunks copied on write, closed once no read can hold them (`commit`)
        self.chunk_gens: list[int] = []
        # Per chunk, room for more (grown between writes: the write-back thread indexes them):
        self.chunk_crcs = np.empty(0, dtype=np.int64)  # the CRC-32 at the last snapshot, or CHANGED
        self.frozen = np.empty(0, dtype=bool)  # named by a snapshot: copy before writing
        self.snapshot_id = 0
        self.step = 0
        self.keys = torch.empty(0, dtype=torch.int64)  # of the snapshot opened
        self.kept: list[dict] = []
        self.bytes_read = self.bytes_written = 0
        self.read_s = self.write_s = 0.0  # time inside read (the caller waits) and applying writes (in the background)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ssd-write-back")
        self.readers = readers
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="ssd-io")
        self._queued: list[tuple[Future, torch.Tensor]] = []  # (write, its sorted slots), oldest first
        self._io = None
        if (self.root / "CURRENT").exists():
            self._open(verify)
        self.io = io  # after opening: the manifest sets chunk_rows, which decides whether `map` can be had

    # -- files -------------------------------------------------------------------------------------

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.value_width * 4

    def _chunk_path(self, chunk: int, gen: int) -> Path:
        return self.root / f"chunk-{chunk:06d}.g{gen:06d}.bin"

    @property
    def io(self) -> str:
        return self._io

    @io.setter
    def io(self, io: str) -> None:
        """One of IO_MODES; setting it lets go of the maps (their pages can leave the page cache) and, for
        `map`, maps every chunk afresh."""
        if io not in IO_MODES:
            raise ValueError(f"SSD table io {io!r} is unknown; choose one of {', '.join(IO_MODES)}")
        if io == "map" and (LIBC is None or self.chunk_bytes % mmap.PAGESIZE):
            log.warning("SSD table %s: its chunks cannot be mapped as one range here (%s); mapping each on its own "
                        "(io=chunk-maps)", self.root, "not Linux" if LIBC is None else
                        f"chunks of {self.chunk_bytes} bytes are not whole pages of {mmap.PAGESIZE}")
            io = "chunk-maps"
        self.wait_for_writes()
        self._io = io
        self.maps = [None] * len(self.chunks)
        self._range = self._rows = None
        if io == "map":
            self._map_range()

    def _map_range(self) -> None:
        """Reserve a range for twice the chunks (RANGE_BYTES at least) and map every chunk file in it. A read or
        write still running on the range before keeps that one mapped until it ends."""
        self.wait_for_writes()  # a copy on write maps into the range it finds: not one being replaced
        chunk_range = _ChunkRange(self.chunk_bytes, max(2 * len(self.chunks), RANGE_BYTES // self.chunk_bytes))
        for chunk, file in enumerate(self.chunks):
            chunk_range.map(chunk, file.fileno())
        self._range, self._rows = chunk_range, chunk_range.rows(len(self.chunks) * self.chunk_rows, self.value_width)

    def _open_chunk(self, chunk: int) -> None:
        """Open (or, after a copy on write, reopen) a chunk's file, and map it in the range under `map`."""
        file = open(self._chunk_path(chunk, self.chunk_gens[chunk]), "r+b", buffering=0)
        reopened = chunk < len(self.chunks)
        if reopened:
            self.chunks[chunk], self.maps[chunk] = file, None
        else:
            self.chunks.append(file)
            self.maps.append(None)
        if self._range is None:
            return
        if chunk >= self._range.chunks:  # a new chunk past the range (a copy on write reopens one inside it)
            self._map_range()
            return
        self._range.map(chunk, file.fileno())
        if not reopened:  # only the caller's thread adds chunks, and so replaces the array
            self._rows = self._range.rows(len(self.chunks) * self.chunk_rows, self.value_width)

    def _grow_chunk_state(self, chunks: int) -> None:
        """Room for `chunks` chunks in `frozen` and `chunk_crcs` (doubling); replaced only between writes."""
        if chunks <= self.frozen.size:
            return
        self.wait_for_writes()
        more = max(chunks, 2 * self.frozen.size) - self.frozen.size
        self.frozen = np.concatenate([self.frozen, np.zeros(more, dtype=bool)])
        self.chunk_crcs = np.concatenate([self.chunk_crcs, np.full(more, CHANGED, dtype=np.int64)])

    def _map(self, chunk: int) -> torch.Tensor:
        """[chunk_rows, W] over the chunk file's memory map."""
        if self.maps[chunk] is None:
            mapped = np.memmap(self.chunks[chunk], dtype=np.float32, mode="r+", shape=(self.chunk_rows, self.value_width))
            mapped._mmap.madvise(mmap.MADV_RANDOM)  # no read-ahead of neighbouring, unused pages
            self.maps[chunk] = torch.from_numpy(mapped)
        return self.maps[chunk]

    def _check(self, path: Path, size: int, crc: int, manifest: Path, verify: bool) -> None:
        if not path.exists():
            raise DamagedTableError(f"SSD table file {path} is missing (named by {manifest}); restore the directory "
                                    f"from a backup or start a new table elsewhere")
        actual = path.stat().st_size
        if actual != size:
            raise DamagedTableError(f"SSD table file {path} is truncated or damaged: {actual} bytes, {manifest} "
                                    f"says {size}; restore the directory from a backup or start a new table elsewhere")
        if verify and file_crc32(path) != crc:
            raise DamagedTableError(f"SSD table file {path} is damaged: its CRC-32 does not match {manifest}; "
                                    f"restore the directory from a backup or start a new table elsewhere")

    def _open(self, verify: bool) -> None:
        current = self.root / "CURRENT"
        manifest_path = self.root / current.read_text().strip()
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}")
        except (OSError, ValueError) as error:
            raise DamagedTableError(f"SSD table manifest {manifest_path} is missing or damaged ({error}); restore "
                                    f"the directory from a backup or start a new table elsewhere") from error
        if manifest["version"] != VERSION:
            raise ValueError(f"SSD table {self.root} has format version {manifest['version']}; this terarec reads {VERSION}")
        stored = {k: manifest["meta"].get(k) for k in self.meta}
        if stored != self.meta:
            raise ValueError(f"SSD table {self.root} holds rows of {manifest['meta']}; this store expects {self.meta}. "
                             f"Point store.path at another directory or match the embedding dim and optimizer")
        self.chunk_rows = manifest["chunk_rows"]
        self._grow_chunk_state(len(manifest["chunks"]))
        for chunk, entry in enumerate(manifest["chunks"]):
            self._check(self.root / entry["file"], self.chunk_bytes, entry["crc32"], manifest_path, verify)
            self.chunk_gens.append(entry["gen"])
            self.chunk_crcs[chunk] = entry["crc32"]
            self.frozen[chunk] = True
            self._open_chunk(chunk)
        keys_path = self.root / manifest["keys"]["file"]
        self._check(keys_path, manifest["keys"]["bytes"], manifest["keys"]["crc32"], manifest_path, verify)
        self.keys = torch.from_numpy(np.fromfile(keys_path, dtype=np.int64))
        self.snapshot_id = manifest["snapshot"]
        self.step = manifest["step"]
        self.kept = [manifest]

    # -- the tier interface ------------------------------------------------------------------------

    def reserve(self, rows: int) -> None:
        self._grow_chunk_state(-(-rows // self.chunk_rows))  # new chunks: not frozen, CHANGED
        while len(self.chunks) * self.chunk_rows < rows:
            chunk = len(self.chunks)
            with open(self._chunk_path(chunk, 0), "wb") as f:
                f.truncate(self.chunk_bytes)
            self.chunk_gens.append(0)
            self._open_chunk(chunk)

    def _chunk_groups(self, sorted_slots: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
        """Ascending [N] slots -> (chunk, first row, end row, the rows' records in the chunk) per chunk."""
        chunks, counts = torch.unique_consecutive(sorted_slots // self.chunk_rows, return_counts=True)
        groups, begin = [], 0
        for chunk, count in zip(chunks.tolist(), counts.tolist()):
            groups.append((chunk, begin, begin + count, sorted_slots[begin:begin + count] - chunk * self.chunk_rows))
            begin += count
        return groups

    def _runs(self, sorted_slots: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Ascending [N] slots -> (chunk, byte offset in its file, first row, end row) per run of adjacent
        records within one chunk."""
        slots = sorted_slots.numpy()
        chunk_of = slots // self.chunk_rows
        starts_run = np.ones(slots.size, dtype=bool)
        starts_run[1:] = (np.diff(slots) != 1) | (np.diff(chunk_of) != 0)
        starts = np.flatnonzero(starts_run)
        ends = np.append(starts[1:], slots.size)
        offsets = (slots[starts] - chunk_of[starts] * self.chunk_rows) * self.row_bytes
        return list(zip(chunk_of[starts].tolist(), offsets.tolist(), starts.tolist(), ends.tolist()))

    def _move(self, sorted_slots: torch.Tensor, rows: torch.Tensor, write: bool) -> None:
        """Rows [N, W] of ascending slots [N] from (or, with `write`, to) the chunk files, the `io` way, split
        among the I/O threads when there is enough to split."""
        if sorted_slots.numel() == 0:
            return
        if self.io == "map":
            table = self._rows  # taken once: a new chunk past the range replaces it meanwhile
            first, last = int(sorted_slots[0]), int(sorted_slots[-1])
            if first < 0 or last >= table.shape[0]:
                raise IndexError(f"SSD table {self.root} has rows [0, {table.shape[0]}); slots [{first}, {last}] "
                                 f"reach outside them (reserve first)")
            items, per_thread = self._row_ranges(sorted_slots.numel()), 1
            move = partial(self._move_in_range, table, sorted_slots.numpy())
        elif self.io == "chunk-maps":
            items, per_thread, move = self._chunk_groups(sorted_slots), 1, self._move_mapped
        else:
            items, per_thread, move = self._runs(sorted_slots), RUNS_PER_READER, self._move_positional
        parts = min(self.readers, len(items) // per_thread)
        if parts < 2:
            move(items, rows, write)
            return
        step = -(-len(items) // parts)
        shares = [items[i:i + step] for i in range(0, len(items), step)]
        list(self._readers.map(move, shares, [rows] * len(shares), [write] * len(shares)))

    def _row_ranges(self, rows: int) -> list[tuple[int, int]]:
        """[0, rows) in up to READERS equal ranges of at least ROWS_PER_READER rows (one if fewer)."""
        parts = max(1, min(self.readers, rows // ROWS_PER_READER))
        return [(rows * part // parts, rows * (part + 1) // parts) for part in range(parts)]

    @staticmethod
    def _move_in_range(table: np.ndarray, slots: np.ndarray, ranges: list, rows: torch.Tensor, write: bool) -> None:
        """`map`: one numpy gather (scatter) per range of rows; numpy releases the GIL for either and, unlike
        torch's, runs on this thread alone (no intra-op pool per I/O thread)."""
        rows = rows.numpy()
        for begin, end in ranges:
            if write:
                table[slots[begin:end]] = rows[begin:end]
            else:  # "clip": `_move` checked the slots, and "raise" would gather into a buffer, then copy
                np.take(table, slots[begin:end], axis=0, out=rows[begin:end], mode="clip")

    def _move_mapped(self, groups: list, rows: torch.Tensor, write: bool) -> None:
        for chunk, begin, end, records in groups:
            if write:
                self._map(chunk).index_copy_(0, records, rows[begin:end])
            else:
                torch.index_select(self._map(chunk), 0, records, out=rows[begin:end])

    def _move_positional(self, runs: list, rows: torch.Tensor, write: bool) -> None:
        move, data, size = (os.pwritev if write else os.preadv), memoryview(rows.numpy()).cast("B"), self.row_bytes
        files = [file.fileno() for file in self.chunks]  # now: a write may have copied a chunk to a new file
        for chunk, offset, begin, end in runs:
            if move(files[chunk], [data[begin * size:end * size]], offset) != (end - begin) * size:
                raise DamagedTableError(f"SSD table file {self.chunks[chunk].name} is shorter than its "
                                        f"{self.chunk_bytes} bytes; restore the directory from a backup")

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """[N] slots -> [N, W] rows (CPU, pinned if `pinned`), written ones included even while their write is queued."""
        started = time.perf_counter()
        slots = slots.to("cpu", torch.int64)
        self.wait_for_writes(slots)
        out = torch.empty((slots.numel(), self.value_width), pin_memory=self.pinned)
        if slots.numel() == 0:
            return out
        in_order = bool((slots[1:] >= slots[:-1]).all())
        order = None if in_order else torch.argsort(slots)
        staged = out if in_order else torch.empty_like(out)  # rows in ascending slot order
        self._move(slots if in_order else slots[order], staged, write=False)
        if not in_order:
            out.index_copy_(0, order, staged)
        self.bytes_read += out.numel() * 4
        self.read_s += time.perf_counter() - started
        return out

    peek = read

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Queue [N] unique slots' rows [N, W] for writing; reads and `commit` see them from now on."""
        slots = slots.to("cpu", torch.int64)
        sorted_slots, order = torch.sort(slots)
        values = values.detach().to(torch.float32)[order.to(values.device)].cpu()  # a copy, in sorted slot order
        while len(self._queued) >= MAX_QUEUED_WRITES:
            self._queued.pop(0)[0].result()
        job = self._writer.submit(self._apply, sorted_slots, values)
        self._queued.append((job, sorted_slots))
        self.bytes_written += values.numel() * 4

    put = write  # the bottom tier: rows are always here

    def _apply(self, sorted_slots: torch.Tensor, values: torch.Tensor) -> None:
        """Write one queued write (on the write-back thread)."""
        started = time.perf_counter()
        touched = torch.unique_consecutive(sorted_slots // self.chunk_rows).numpy()
        for chunk in touched[self.frozen[touched]].tolist():
            self._copy_on_write(chunk)
        self.chunk_crcs[touched] = CHANGED
        self._move(sorted_slots, values, write=True)
        self.write_s += time.perf_counter() - started

    def wait_for_writes(self, slots: torch.Tensor | None = None) -> None:
        """Wait for the queued writes that touch `slots` (all of them if None) and every write before
        them; collect finished ones. Raises what a write raised."""
        last = max((i for i, (_, written) in enumerate(self._queued)
                    if slots is None or bool(torch.isin(slots, written).any())), default=-1)
        while self._queued and (last >= 0 or self._queued[0][0].done()):
            self._queued.pop(0)[0].result()
            last -= 1

    def sync(self) -> None:
        """Apply every queued write and make the changed chunk files durable, without taking a snapshot."""
        self.wait_for_writes()
        for chunk in np.flatnonzero(self.chunk_crcs[: len(self.chunks)] == CHANGED).tolist():
            os.fsync(self.chunks[chunk].fileno())

    def _copy_on_write(self, chunk: int) -> None:
        source = self._chunk_path(chunk, self.chunk_gens[chunk])
        shutil.copyfile(source, self._chunk_path(chunk, self.chunk_gens[chunk] + 1))
        self.chunk_gens[chunk] += 1
        self.retired.append(self.chunks[chunk])  # a read on another thread may still be reading through it
        self._open_chunk(chunk)  # under `map`, its new file now lies where the old one did
        self.frozen[chunk] = False

    # -- snapshots ---------------------------------------------------------------------------------

    def commit(self, keys: torch.Tensor, step: int) -> int:
        """Make the current rows, `keys` (in slot order) and `step` the next snapshot; returns its id."""
        self.sync()
        for file in self.retired:  # the caller reads nothing while it commits
            file.close()
        self.retired = []
        snapshot = self.snapshot_id + 1
        entries = []
        for chunk in range(len(self.chunks)):
            path = self._chunk_path(chunk, self.chunk_gens[chunk])
            if self.chunk_crcs[chunk] == CHANGED:
                self.chunk_crcs[chunk] = file_crc32(path)
            entries.append({"file": path.name, "gen": self.chunk_gens[chunk], "crc32": int(self.chunk_crcs[chunk])})
        keys_bytes = keys.cpu().numpy().astype(np.int64).tobytes()
        keys_name = f"keys-{snapshot:06d}.bin"
        _write_durably(self.root / keys_name, keys_bytes)
        manifest = {"format": FORMAT, "version": VERSION, "snapshot": snapshot, "step": step, "meta": self.meta,
                    "rows": int(keys.numel()), "chunk_rows": self.chunk_rows, "chunks": entries,
                    "keys": {"file": keys_name, "bytes": len(keys_bytes), "crc32": zlib.crc32(keys_bytes)}}
        manifest_name = f"snapshot-{snapshot:06d}.json"
        _write_durably(self.root / manifest_name, json.dumps(manifest, indent=1).encode())
        _write_durably(self.root / "CURRENT.tmp", manifest_name.encode())
        os.replace(self.root / "CURRENT.tmp", self.root / "CURRENT")
        directory = os.open(self.root, os.O_RDONLY)
        os.fsync(directory)
        os.close(directory)
        self.snapshot_id, self.step = snapshot, step
        self.frozen[: len(self.chunks)] = True
        self.kept = [*self.kept, manifest][-self.keep:]
        self._collect_garbage()
        return snapshot

    def _collect_garbage(self) -> None:
        """Delete chunk, key and manifest files that no kept snapshot names."""
        named = {"CURRENT"}
        for manifest in self.kept:
            named |= {entry["file"] for entry in manifest["chunks"]}
            named |= {manifest["keys"]["file"], f"snapshot-{manifest['snapshot']:06d}.json"}
        for path in self.root.iterdir():
            if path.name not in named and path.name.startswith(("chunk-", "keys-", "snapshot-")):
                path.unlink()

    def metrics(self) -> dict[str, float]:
        return {f"{self.name}_bytes_read": float(self.bytes_read), f"{self.name}_bytes_written": float(self.bytes_written),
                f"{self.name}_read_s": self.read_s, f"{self.name}_write_s": self.write_s,
                f"{self.name}_snapshot": float(self.snapshot_id)}
