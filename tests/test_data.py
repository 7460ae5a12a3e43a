"""The data pipeline on real files: synthetic data, the TSV converter, the batch reader, the CLI."""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from terarec.models.batch import Batch
from terarec.platform.data_cli import register
from terarec.core.data.criteo import MISSING_ID, OOV_ID, convert_tsv
from terarec.core.data.errors import (BadDataError, DataArgumentError, DataError, DataNotFoundError,
                                          MalformedInputError, OutputExistsError, SchemaMismatchError)
from terarec.core.data.reader import BatchReader, count_rows, list_split_files
from terarec.core.data.schema import DENSE_COLUMNS, SPARSE_COLUMNS, arrow_schema, label_columns_of
from terarec.core.data.synth import HiddenModel, cardinalities_for, write_synthetic

MASK = 2**64 - 1


def splitmix64_reference(x: int) -> int:
    """Plain-Python splitmix64 finalizer, signed: the oracle for the vectorized one."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return z - 2**64 if z >= 2**63 else z


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    positives = labels.sum()
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * (len(labels) - positives)))


def read_all(reader: BatchReader) -> list[Batch]:
    with reader:
        return list(reader)


def assert_same(a: Batch, b: Batch) -> None:
    assert torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """1001 train rows (no eval) in 4 files of 50-row groups, two tasks."""
    out = str(tmp_path_factory.mktemp("reader"))
    write_synthetic(out, rows=1001, seed=7, tasks=("click", "conversion"), eval_fraction=0.0, rows_per_file=300,
                    row_group_size=50)
    return out


# --- synthetic data ---------------------------------------------------------------------------------------------

def test_synth_is_deterministic_and_has_the_schema(tmp_path):
    summaries = [write_synthetic(str(tmp_path / name), rows=3000, seed=seed, rows_per_file=1000, row_group_size=400)
                 for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    tables = [pq.read_table(tmp_path / name / "train") for name in "abc"]
    assert tables[0].equals(tables[1]) and not tables[0].equals(tables[2])
    assert tables[0].schema == arrow_schema() and tables[0].num_rows == 2700
    assert summaries[0].eval_rows == 300 and pq.read_table(tmp_path / "a" / "eval").num_rows == 300
    assert sorted(os.listdir(tmp_path / "a" / "train")) == ["part-00000.parquet", "part-00001.parquet",
                                                            "part-00002.parquet"]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["rows"] == 3000 and meta["seed"] == 1 and meta["tasks"] == ["click"]
    assert meta["cardinalities"]["C3"] == 10131 and meta["cardinalities"]["C9"] == 2
    assert 0.2 < meta["ctr"] < 0.3
    ids = np.stack([tables[0].column(name).to_numpy() for name in SPARSE_COLUMNS], axis=1)
    assert (ids < 0).any() and (np.abs(ids) > 2**32).mean() > 0.9  # arbitrary 64-bit IDs, not small ints
    dense = np.stack([tables[0].column(name).to_numpy() for name in DENSE_COLUMNS], axis=1)
    assert dense.min() >= 0 and (dense == 0).any() and np.isfinite(dense).all()


def test_synth_ids_are_zipf_skewed(tmp_path):
    write_synthetic(str(tmp_path), rows=20_000, seed=0, eval_fraction=0.0)
    ids = pq.read_table(tmp_path / "train", columns=["C3"]).column("C3").to_numpy()
    _, counts = np.unique(ids, return_counts=True)
    counts = np.sort(counts)[::-1]
    assert counts[0] / len(ids) > 0.05  # the head ID alone is a sizable share
    assert counts[: max(1, len(counts) // 100)].sum() / len(ids) > 0.3  # top 1% of IDs: a third of the rows
    assert (counts == 1).sum() > len(counts) / 3  # and a long tail of singletons


def test_synth_second_task_follows_clicks(dataset):
    table = pq.read_table(os.path.join(dataset, "train"))
    assert label_columns_of(table.schema) == ["label", "label_conversion"]
    click, conversion = table.column("label").to_numpy(), table.column("label_conversion").to_numpy()
    assert (conversion <= click).all() and 0 < conversion.sum() < click.sum()


def fit_logistic_regression(keys: np.ndarray, dense: np.ndarray, labels: np.ndarray, num_keys: int, steps: int = 150):
    """Full-batch Adam on one weight per (feature, ID) key plus dense weights; returns a scoring function."""
    weights, dense_weights, bias = np.zeros(num_keys), np.zeros(dense.shape[1]), np.zeros(1)
    params = [weights, dense_weights, bias]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]

    def score(k, d):
        return weights[k].sum(1) + d @ dense_weights + bias[0]

    for step in range(1, steps + 1):
        residual = 1 / (1 + np.exp(-score(keys, dense))) - labels
        grads = [np.bincount(keys.ravel(), np.repeat(residual, keys.shape[1]), num_keys) / len(labels) + 1e-4 * weights,
                 dense.T @ residual / len(labels), np.array([residual.mean()])]
        for param, grad, (m, v) in zip(params, grads, moments):
            m[:] = 0.9 * m + 0.1 * grad
            v[:] = 0.999 * v + 0.001 * grad**2
            param -= 0.1 * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return score


def test_hidden_model_interactions_beat_logistic_regression():
    model = HiddenModel(0, cardinalities_for(1e-3), num_tasks=1)
    rng = np.random.default_rng(11)
    dense, ranks = model.draw(rng, 70_000)
    logits = model.logits(dense, ranks)
    labels = model.labels(rng, logits)[:, 0]
    keys = ranks + np.concatenate([[0], np.cumsum(model.cardinalities)[:-1]])
    train, test = slice(0, 50_000), slice(50_000, None)
    score = fit_logistic_regression(keys[train], dense[train].astype(np.float64), labels[train],
                                    sum(model.cardinalities))
    linear_auc = auc(score(keys[test], dense[test]), labels[test])
    oracle_auc = auc(logits[test, 0], labels[test])
    assert 0.23 < labels.mean() < 0.27
    assert linear_auc > 0.62, linear_auc  # the linear part is learnable
    assert oracle_auc > linear_auc + 0.06, (oracle_auc, linear_auc)  # interactions matter
    print(f"oracle AUC {oracle_auc:.3f}, logistic regression AUC {linear_auc:.3f}")


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(DataArgumentError, match="eval_fraction"):
        write_synthetic(str(tmp_path), rows=10, eval_fraction=1.0)
    with pytest.raises(DataArgumentError, match="task name"):
        write_synthetic(str(tmp_path), rows=10, tasks=("click", "Bad-Name"))
    write_synthetic(str(tmp_path), rows=10)
    with pytest.raises(OutputExistsError, match="already holds parquet files"):
        write_synthetic(str(tmp_path), rows=10)


# --- TSV conversion ---------------------------------------------------------------------------------------------

HEX = [f"{(i * 0x9E3779B1) & 0xFFFFFFFF:08x}" for i in range(1, 27)]
GOOD_1 = "\t".join(["1", "5", "-3", "", "0", "1000"] + [""] * 7 + ["12"] + HEX[:3] + [""] + HEX[4:])
GOOD_2 = "\t".join(["0"] + ["1"] * 13 + [h.upper() for h in HEX])
MALFORMED = {  # line text -> the words its reason must contain
    "0\t1\t2": "expected 40 tab-separated fields, got 3",
    "\t".join(["2"] + ["1"] * 13 + HEX): "label must be 0 or 1",
    "\t".join(["0", "1", "abc"] + ["1"] * 11 + HEX): "I2 must be an integer",
    "\t".join(["0", "1.5"] + ["1"] * 12 + HEX): "I1 must be an integer",
    "\t".join(["1"] + ["1"] * 13 + HEX[:4] + ["zz12"] + HEX[5:]): "C5 must be a hex string",
    "\t".join(["1"] + ["1"] * 13 + ["1" * 17] + HEX[1:]): "C1 must be a hex string",
    "": "expected 40 tab-separated fields, got 1",
}


def write_tsv(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_convert_writes_exactly_the_valid_rows(tmp_path):
    lines = [GOOD_1, *MALFORMED, GOOD_2]
    summary = convert_tsv(write_tsv(tmp_path / "in.tsv", lines), str(tmp_path / "out"), eval_fraction=0.0)
    assert summary.rows_written == summary.train_rows == 2 and summary.malformed == len(MALFORMED)
    assert [error.line for error in summary.first_errors] == list(range(2, 2 + len(MALFORMED)))
    for error, words in zip(summary.first_errors, MALFORMED.values()):
        assert words in error.reason, error
    table = pq.read_table(tmp_path / "out" / "train")
    assert table.schema == arrow_schema()
    assert table.column("label").to_pylist() == [1.0, 0.0]
    raw_dense = [5, -3, 0, 0, 1000] + [0] * 7 + [12]
    expected = np.log1p(np.maximum(raw_dense, 0)).astype(np.float32)
    assert np.array_equal([table.column(c)[0].as_py() for c in DENSE_COLUMNS], expected)
    assert all(table.column(c)[1].as_py() == np.float32(math.log(2)) for c in DENSE_COLUMNS)
    expected_ids = [splitmix64_reference(int(h, 16)) for h in HEX]
    first = [table.column(c)[0].as_py() for c in SPARSE_COLUMNS]
    assert first == expected_ids[:3] + [MISSING_ID] + expected_ids[4:]
    assert MISSING_ID == splitmix64_reference(2**64 - 1)
    assert [table.column(c)[1].as_py() for c in SPARSE_COLUMNS] == expected_ids  # hex case does not matter


def test_convert_strict_names_the_line_and_leaves_nothing(tmp_path):
    path = write_tsv(tmp_path / "in.tsv", [GOOD_1, GOOD_2, list(MALFORMED)[2]])
    with pytest.raises(MalformedInputError, match=r"in\.tsv, line 3: I2 must be an integer"):
        convert_tsv(path, str(tmp_path / "out"), strict=True)
    assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files]


def test_convert_eval_split_and_errors(tmp_path):
    lines = [GOOD_1 if i % 2 else GOOD_2 for i in range(400)]
    summary = convert_tsv(write_tsv(tmp_path / "in.tsv", lines), str(tmp_path / "out"), eval_fraction=0.3,
                          row_group_size=64)
    assert summary.rows_written == 400 and summary.malformed == 0
    assert 60 < summary.eval_rows < 180 and summary.train_rows + summary.eval_rows == 400
    assert count_rows(list_split_files(str(tmp_path / "out"), "eval")) == summary.eval_rows
    with pytest.raises(DataError, match="no valid Criteo line"):
        convert_tsv(write_tsv(tmp_path / "bad.tsv", list(MALFORMED)), str(tmp_path / "out2"))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        convert_tsv(str(tmp_path / "nope.tsv"), str(tmp_path / "out3"))


def numbered_line(i: int) -> str:
    """Line i: label i % 2, I1 = i (to find the row again), C1 = i % 3 (IDs of known counts), C2 = i (each once),
    C3..C26 one constant."""
    return "\t".join([str(i % 2), str(i)] + ["0"] * 12 + [f"{i % 3:x}", f"{100 + i:x}"] + ["a"] * 24)


def written_rows(out, split: str) -> dict[int, list[int]]:
    """{I1 as the raw count i: [C1, C2, C3] raw IDs} of one split."""
    table = pq.read_table(out / split)
    counts = np.rint(np.expm1(table.column("I1").to_numpy())).astype(int)
    return {int(i): [table.column(c)[row].as_py() for c in ("C1", "C2", "C3")] for row, i in enumerate(counts)}


@pytest.fixture
def days(tmp_path):
    """Lines 0-3 in day_1.tsv, 4-6 in day_2.tsv.gz, 7-9 in day_10.tsv: natural order is the line order."""
    for name, numbers in (("day_1.tsv", range(4)), ("day_2.tsv.gz", range(4, 7)), ("day_10.tsv", range(7, 10))):
        text = "".join(numbered_line(i) + "\n" for i in numbers).encode()
        (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    return tmp_path


def test_convert_tail_split_and_eval_from_follow_the_file_order(days):
    summary = convert_tsv(str(days / "day_*"), str(days / "tail"), eval_fraction=0.3, split="tail")
    assert summary.inputs == [str(days / name) for name in ("day_1.tsv", "day_2.tsv.gz", "day_10.tsv")]
    assert sorted(written_rows(days / "tail", "train")) == list(range(7))
    assert sorted(written_rows(days / "tail", "eval")) == [7, 8, 9]
    convert_tsv([str(days / "day_1.tsv"), str(days / "day_2.tsv.gz"), str(days / "day_10.tsv")],
                str(days / "from"), eval_from=str(days / "day_2.tsv.gz"))
    assert sorted(written_rows(days / "from", "train")) == [0, 1, 2, 3]
    assert sorted(written_rows(days / "from", "eval")) == list(range(4, 10))
    meta = json.loads((days / "from" / "meta.json").read_text())
    assert meta["eval_split"] == "eval_from" and meta["dense_transform"] == "log1p(max(x, 0))"
    with pytest.raises(DataArgumentError, match="--eval-from .*day_3.tsv is not one of the input files"):
        convert_tsv(str(days / "day_*"), str(days / "bad"), eval_from=str(days / "day_3.tsv"))
    with pytest.raises(DataNotFoundError, match="matches no file"):
        convert_tsv(str(days / "week_*"), str(days / "bad"))


def test_convert_min_count_maps_rare_ids_to_one_oov_id_per_feature(days):
    convert_tsv(str(days / "day_*"), str(days / "out"), eval_fraction=0.3, split="tail", min_count=3)
    hex_id = lambda value: splitmix64_reference(int(value, 16))  # noqa: E731
    # training lines 0-6 hold C1 = 0, 1, 2, 0, 1, 2, 0: only 0 is seen 3 times; every C2 once; C3 always
    expected = {i: [hex_id("0") if i % 3 == 0 else OOV_ID, OOV_ID, hex_id("a")] for i in range(10)}
    assert written_rows(days / "out", "train") == {i: expected[i] for i in range(7)}
    assert written_rows(days / "out", "eval") == {i: expected[i] for i in range(7, 10)}
    meta = json.loads((days / "out" / "meta.json").read_text())
    assert meta["min_count"] == 3 and meta["oov_id"] == OOV_ID and meta["vocabulary_sizes"][:3] == [1, 0, 1]
    assert OOV_ID == splitmix64_reference(2**64 - 2) and OOV_ID not in (MISSING_ID, hex_id("0"))


# --- the reader -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, drop_last", [(60, True), (132, False)])
def test_reader_slices_are_world_size_independent(dataset, batch_size, drop_last):
    files = list_split_files(dataset, "train")
    whole = read_all(BatchReader(files, batch_size, seed=3, drop_last=drop_last, epochs=2))
    assert len(whole) == 2 * (1001 // batch_size + (0 if drop_last else 1))
    for world_size in (2, 3, 4):
        if batch_size % world_size:
            continue
        per_rank = [read_all(BatchReader(files, batch_size, rank=r, world_size=world_size, seed=3,
                                         drop_last=drop_last, epochs=2)) for r in range(world_size)]
        for step, batch in enumerate(whole):
            slices = [per_rank[r][step] for r in range(world_size)]
            assert max(map(len, slices)) - min(map(len, slices)) <= 1
            assert_same(Batch.concat(slices), batch)
    assert len(whole[-1]) == (batch_size if drop_last else 1001 % batch_size)


def test_reader_small_last_batch_gives_empty_slices(tmp_path):
    write_synthetic(str(tmp_path), rows=5, eval_fraction=0.0)
    files = list_split_files(str(tmp_path), "train")
    sizes = [len(read_all(BatchReader(files, 8, rank=r, world_size=8, drop_last=False, epochs=1))[0])
             for r in range(8)]
    assert sizes == [0, 1, 0, 1, 1, 0, 1, 1]
    empty = read_all(BatchReader(files, 8, rank=0, world_size=8, drop_last=False, epochs=1))[0]
    assert empty.dense.shape == (0, 13) and empty.sparse.shape == (0, 26) and empty.labels.shape == (0, 1)
    with pytest.raises(DataArgumentError, match="make no global batch"):
        BatchReader(files, 8, epochs=1)


def test_reader_start_step_skips_batches(dataset):
    files = list_split_files(dataset, "train")
    everything = read_all(BatchReader(files, 60, seed=5, epochs=3))
    for start in (1, 16, 20, 40):
        resumed = read_all(BatchReader(files, 60, seed=5, epochs=3, start_step=start))
        assert len(resumed) == len(everything) - start
        for a, b in zip(resumed, everything[start:]):
            assert_same(a, b)
    started = time.perf_counter()
    with BatchReader(files, 60, seed=5, start_step=10**9) as reader:
        next(iter(reader))
    assert time.perf_counter() - started < 2.0  # skipping reads metadata only


def test_reader_shuffle_is_deterministic(dataset):
    files = list_split_files(dataset, "train")
    first = read_all(BatchReader(files, 100, seed=1, epochs=2))
    again = read_all(BatchReader(files, 100, seed=1, epochs=2))
    other = read_all(BatchReader(files, 100, seed=2, epochs=2))
    for a, b in zip(first, again):
        assert_same(a, b)
    assert not torch.equal(first[0].sparse, other[0].sparse)
    assert not torch.equal(first[0].sparse, first[10].sparse)  # epochs are shuffled differently
    ordered = read_all(BatchReader(files, 100, shuffle=False, epochs=1))
    head = pq.ParquetFile(files[0]).read_row_group(0).column("C1").to_numpy()
    assert np.array_equal(ordered[0].sparse[:50, 0].numpy(), head)
    assert sorted(torch.cat([b.sparse[:, 0] for b in ordered]).tolist()) == \
        sorted(torch.cat([b.sparse[:, 0] for b in first[:10]]).tolist())  # a permutation of the same rows


def test_reader_eval_split_and_multitask_labels(tmp_path):
    summary = write_synthetic(str(tmp_path), rows=2000, seed=4, tasks=("click", "conversion"), eval_fraction=0.25,
                              row_group_size=128)
    files = list_split_files(str(tmp_path), "eval")
    batches = read_all(BatchReader(files, 64, shuffle=False, drop_last=False, epochs=1, pin_memory=False))
    assert sum(map(len, batches)) == summary.eval_rows == 500 == count_rows(files)
    assert batches[0].labels.shape == (64, 2) and batches[0].labels.dtype == torch.float32
    assert batches[0].dense.dtype == torch.float32 and batches[0].sparse.dtype == torch.int64
    assert (batches[0].labels[:, 1] <= batches[0].labels[:, 0]).all()


def test_reader_uri_and_missing_directory(dataset, tmp_path):
    files = list_split_files("file://" + dataset, "train")
    assert files[0].startswith("file://") and count_rows(files) == 1001
    assert len(read_all(BatchReader(files, 500, epochs=1))[0]) == 500
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "eval")) as error:
        list_split_files(str(tmp_path), "eval")
    assert isinstance(error.value, FileNotFoundError)


def test_reader_rejects_bad_arguments_and_closes(dataset):
    files = list_split_files(dataset, "train")
    with pytest.raises(ValueError, match="multiple of world_size"):
        BatchReader(files, 100, rank=0, world_size=3)
    reader = BatchReader(files, 10, epochs=None, prefetch=2)
    assert len(next(iter(reader))) == 10
    reader.close()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("terarec-reader")]
    with pytest.raises(StopIteration):
        next(reader)


def write_table(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def criteo_columns(rows: int) -> dict:
    columns = {"label": pa.array(np.zeros(rows, np.float32))}
    columns.update({name: pa.array(np.ones(rows, np.float32)) for name in DENSE_COLUMNS})
    columns.update({name: pa.array(np.arange(rows, dtype=np.int64)) for name in SPARSE_COLUMNS})
    return columns


def test_reader_rejects_missing_columns_nan_and_corrupt_files(dataset, tmp_path):
    columns = criteo_columns(20)
    del columns["C5"]
    with pytest.raises(SchemaMismatchError, match=r"nocol\.parquet has no column 'C5'"):
        BatchReader([write_table(tmp_path / "nocol.parquet", columns)], 10)

    columns = criteo_columns(20)
    columns["I3"] = pa.array(np.where(np.arange(20) == 7, np.nan, 1.0).astype(np.float32))
    with pytest.raises(BadDataError, match=r"nan\.parquet, row group 0: column I3 is NaN in row 7"):
        read_all(BatchReader([write_table(tmp_path / "nan.parquet", columns)], 10, epochs=1))

    source = list_split_files(dataset, "train")[0]
    data = open(source, "rb").read()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadDataError, match="truncated.parquet is not a readable parquet file"):
        BatchReader([str(truncated)], 10)

    corrupt = tmp_path / "corrupt.parquet"
    middle = len(data) // 2
    corrupt.write_bytes(data[:4] + bytes(np.random.default_rng(0).integers(0, 256, middle, np.uint8)) + data[4 + middle:])
    reader = BatchReader([str(corrupt)], 10, epochs=1)
    with pytest.raises(BadDataError, match=r"cannot decode .*corrupt\.parquet, row group"):
        read_all(reader)


# --- CLI --------------------------------------------------------------------------------------------------------

def test_cli_synth_and_convert(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers().add_parser("data").add_subparsers())
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "s"), "--rows", "500", "--tasks",
                              "click,conversion", "--eval-fraction", "0.2"])
    assert args.func(args) == 0
    assert "Wrote 500 synthetic rows" in capsys.readouterr().out
    assert label_columns_of(pq.read_schema(list_split_files(str(tmp_path / "s"), "train")[0])) == \
        ["label", "label_conversion"]
    tsv = write_tsv(tmp_path / "in.tsv", [GOOD_1, list(MALFORMED)[1], GOOD_2])
    args = parser.parse_args(["data", "convert", "--in", tsv, "--out", str(tmp_path / "c"), "--eval-fraction", "0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "2 rows" in out and "1 malformed" in out and "line 2: label must be 0 or 1" in out
    args = parser.parse_args(["data", "convert", "--in", tsv, "--out", str(tmp_path / "d"), "--strict"])
    with pytest.raises(MalformedInputError, match="line 2"):
        args.func(args)
