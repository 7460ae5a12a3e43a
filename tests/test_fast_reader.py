"""The column-copy reader against the parquet reader: the same global stream for any worker count and after a
resume; damaged copies named in one line and rebuilt; the pinned ring and side-stream copy on a GPU."""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from terarec.core.data.columns import column_paths, open_columns
from terarec.core.data.errors import DataArgumentError
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.data.synth import write_synthetic
from terarec.models.batch import Batch


def read_all(files, batch_size, **options) -> list[Batch]:
    with BatchReader(files, batch_size, **options) as reader:
        return list(reader)


def assert_same_stream(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense, y.dense) and torch.equal(x.sparse, y.sparse) and torch.equal(x.labels, y.labels)


@pytest.fixture()
def files(tmp_path):
    """1001 train rows in 4 files of 50-row groups (the last ones shorter), two tasks."""
    write_synthetic(str(tmp_path), rows=1001, seed=11, tasks=("click", "conversion"), eval_fraction=0.0,
                    rows_per_file=300, row_group_size=50)
    return list_split_files(str(tmp_path), "train")


@pytest.mark.parametrize("batch_size, drop_last", [(60, True), (132, False)])
def test_columns_give_the_parquet_stream_for_1_2_3_workers(files, batch_size, drop_last):
    for world_size in (1, 2, 3):
        if batch_size % world_size:
            continue
        for rank in range(world_size):
            options = dict(rank=rank, world_size=world_size, seed=4, drop_last=drop_last, epochs=3)
            parquet = read_all(files, batch_size, columns=False, **options)
            fast = read_all(files, batch_size, columns=True, threads=3, prefetch=2, **options)
            assert_same_stream(fast, parquet)
    assert os.path.exists(column_paths(files[0])[0])


def test_columns_resume_at_step_k_like_parquet(files):
    everything = read_all(files, 60, seed=2, epochs=3, columns=False)
    for start in (1, 16, 17, 33):
        resumed = read_all(files, 60, seed=2, epochs=3, start_step=start, threads=2, columns=True)
        assert_same_stream(resumed, everything[start:])


def test_unshuffled_eval_stream_and_uris(files):
    options = dict(shuffle=False, drop_last=False, epochs=1, pin_memory=False)
    assert_same_stream(read_all(files, 64, columns=True, **options), read_all(files, 64, columns=False, **options))
    with pytest.raises(DataArgumentError, match="local files only"):
        BatchReader(["file://" + path for path in files], 64, columns=True)


def test_copies_are_built_once_by_concurrent_readers(files):
    opened = []
    threads = [threading.Thread(target=lambda: opened.append(open_columns(files[0]))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 3 and len({column.rows for column in opened}) == 1
    assert sorted(os.listdir(os.path.dirname(opened[0].path))) == ["part-00000.bin", "part-00000.bin.lock",
                                                                 "part-00000.json"]
    for column in opened:
        out = np.empty((50, 26), np.int64)
        column.read_into("sparse", 50, 100, out)
        assert np.array_equal(out, pq.ParquetFile(files[0]).read_row_group(1).to_pandas()
                              [[f"C{i}" for i in range(1, 27)]].to_numpy())
        column.close()


def damage_by_truncating(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def damage_by_flipping_bytes(path: str) -> None:
    with open(path, "r+b") as stream:
        stream.seek(8000)
        stream.write(b"\xff" * 16)


@pytest.mark.parametrize("damage, says", [(damage_by_truncating, "is truncated"),
                                          (damage_by_flipping_bytes, "is damaged")])
def test_a_damaged_copy_is_named_in_one_line_and_rebuilt(files, caplog, damage, says):
    expected = read_all(files, 100, seed=1, epochs=1, columns=False)
    read_all(files, 100, seed=1, epochs=1)  # builds the copies
    bin_path = column_paths(files[2])[0]
    damage(bin_path)
    with caplog.at_level(logging.WARNING, logger="terarec.core.data.columns"):
        assert_same_stream(read_all(files, 100, seed=1, epochs=1), expected)
    assert [record.getMessage().split(" ")[0] for record in caplog.records] == [bin_path]
    assert says in caplog.records[0].getMessage() and "rebuilding" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="terarec.core.data.columns"):
        assert_same_stream(read_all(files, 100, seed=1, epochs=1), expected)
    assert not caplog.records  # the rebuilt copy is sound


def test_a_damaged_manifest_and_a_changed_source(files, caplog, tmp_path):
    read_all(files, 100, epochs=1)
    manifest = column_paths(files[0])[1]
    with open(manifest, "w") as stream:
        stream.write("{not json")
    with caplog.at_level(logging.WARNING, logger="terarec.core.data.columns"):
        read_all(files, 100, epochs=1)
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(f"{manifest} is damaged")
    # a rewritten parquet file (new bytes under the old name) is read anew, not from the stale copy
    other = tmp_path / "other"
    write_synthetic(str(other), rows=1001, seed=99, tasks=("click", "conversion"), eval_fraction=0.0,
                    rows_per_file=300, row_group_size=50)
    os.replace(list_split_files(str(other), "train")[0], files[0])
    assert_same_stream(read_all(files, 100, shuffle=False, epochs=1),
                       read_all(files, 100, shuffle=False, epochs=1, columns=False))


@pytest.mark.gpu
def test_pinned_ring_and_side_stream_copy_on_the_gpu(files):
    device = torch.device("cuda")
    expected = read_all(files, 60, seed=3, epochs=4, columns=False)
    with BatchReader(files, 60, seed=3, epochs=4, device=device, threads=3, prefetch=3) as reader:
        for step, batch in enumerate(reader):
            assert batch.sparse.device.type == "cuda"
            torch.cuda._sleep(1_000_000)  # a slow step: the ring's slots must not be overwritten under it
            assert torch.equal(batch.sparse.cpu(), expected[step].sparse)
            assert torch.equal(batch.dense.cpu(), expected[step].dense)
    assert step == len(expected) - 1
