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
caller's order with one copy. Two ways to move rows (`io`, bench/ssd_io.py measures
both): `map` gathers each chunk's rows from a memory map of its file with one
index_select (a page fault is a disk read; one call per chunk, the GIL released
throughout), `pread` coalesces runs of adjacent records and moves each run with one
`os.preadv`/`os.pwritev` (no faults, no mapping; but one call, and one trip through
the GIL, per run). Either way the work is split among a pool of READERS threads
when large, so the disk serves a batch's requests together. A write is queued to
one background thread and applied in order, so write-back leaves the caller's
critical path; a read of a slot with a queued write waits for that write, and
`commit` waits for all of them.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .snapshot import file_crc32

FORMAT = "terarec-ssd-table"
VERSION = 1
MAX_QUEUED_WRITES = 4  # a write waits for the oldest queued one beyond this, bounding the memory they hold
READERS = 16  # requests in flight at once: an SSD serves parallel requests far faster
RUNS_PER_READER = 256  # `pread` moves fewer runs on one thread: a hand-off costs more than it saves
IO_MODES = ("map", "pread")


class DamagedTableError(ValueError):
    """A file of an SSD table is missing, truncated or fails its checksum."""


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
        self.maps: list[torch.Tensor | None] = []  # [chunk_rows, W] over a chunk's memory map, made when first used
        self.io = io
        self.retired: list = []  # files of chunks copied on write, closed once no read can hold them (`commit`)
        self.chunk_gens: list[int] = []
        self.chunk_crcs: list[int | None] = []
        self.frozen: list[bool] = []  # named by a snapshot: copy before writing
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
        if (self.root / "CURRENT").exists():
            self._open(verify)

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
        """`map` or `pread`; setting it lets go of the maps (their pages can leave the page cache)."""
        if io not in IO_MODES:
            raise ValueError(f"SSD table io {io!r} is unknown; choose one of {', '.join(IO_MODES)}")
        self._io = io
        self.maps = [None] * len(self.chunks)

    def _open_chunk(self, chunk: int) -> None:
        """Open (or, after a copy on write, reopen) a chunk's file."""
        file = open(self._chunk_path(chunk, self.chunk_gens[chunk]), "r+b", buffering=0)
        if chunk < len(self.chunks):
            self.chunks[chunk], self.maps[chunk] = file, None
        else:
            self.chunks.append(file)
            self.maps.append(None)

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
        for chunk, entry in enumerate(manifest["chunks"]):
            self._check(self.root / entry["file"], self.chunk_bytes, entry["crc32"], manifest_path, verify)
            self.chunk_gens.append(entry["gen"])
            self.chunk_crcs.append(entry["crc32"])
            self.frozen.append(True)
            self._open_chunk(chunk)
        keys_path = self.root / manifest["keys"]["file"]
        self._check(keys_path, manifest["keys"]["bytes"], manifest["keys"]["crc32"], manifest_path, verify)
        self.keys = torch.from_numpy(np.fromfile(keys_path, dtype=np.int64))
        self.snapshot_id = manifest["snapshot"]
        self.step = manifest["step"]
        self.kept = [manifest]

    # -- the tier interface ------------------------------------------------------------------------

    def reserve(self, rows: int) -> None:
        while len(self.chunks) * self.chunk_rows < rows:
            chunk = len(self.chunks)
            with open(self._chunk_path(chunk, 0), "wb") as f:
                f.truncate(self.chunk_bytes)
            self.chunk_gens.append(0)
            self.chunk_crcs.append(None)
            self.frozen.append(False)
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
        if self.io == "map":
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
        for chunk in torch.unique_consecutive(sorted_slots // self.chunk_rows).tolist():
            if self.frozen[chunk]:
                self._copy_on_write(chunk)
            self.chunk_crcs[chunk] = None
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
        for chunk, file in enumerate(self.chunks):
            if self.chunk_crcs[chunk] is None:  # changed since its last snapshot
                os.fsync(file.fileno())

    def _copy_on_write(self, chunk: int) -> None:
        source = self._chunk_path(chunk, self.chunk_gens[chunk])
        shutil.copyfile(source, self._chunk_path(chunk, self.chunk_gens[chunk] + 1))
        self.chunk_gens[chunk] += 1
        self.retired.append(self.chunks[chunk])  # a read on another thread may still be reading through it
        self._open_chunk(chunk)
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
            if self.chunk_crcs[chunk] is None:
                self.chunk_crcs[chunk] = file_crc32(path)
            entries.append({"file": path.name, "gen": self.chunk_gens[chunk], "crc32": self.chunk_crcs[chunk]})
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
        self.frozen = [True] * len(self.chunks)
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
