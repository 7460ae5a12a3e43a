"""Bad input to the README's commands ends in one line naming what to change, exit code 2: no traceback, no
silent wait. Errors raised inside Ray workers included (their traceback goes to RUN_DIR/error.log).

The commands run in this process (`cli.main`), on the session's Ray where they need one: a subprocess
costs seconds of imports on a busy machine."""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from terarec.core.data.synth import write_synthetic
from terarec.platform.cli import main

TINY_JOB = ["--steps", "4", "--batch-size", "240", "--set", "cpus_per_worker=0.5", "--set", "embedding.dim=8"]


def terarec(capsys, *args) -> tuple[int, str]:
    """Run `terarec ARGS` here; (exit code, stdout + stderr). Asserts stderr ends in one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def assert_one_line(code: int, output: str, *needles: str) -> str:
    """Exit 2; the last line is the error and names what it must; no traceback anywhere."""
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("terarec ") and ": error: " in last, output[-3000:]
    for needle in needles:
        assert needle in last, last
    assert "Traceback" not in output, output[-3000:]
    return last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    write_synthetic(str(out), rows=3000, seed=0, cardinality_scale=1e-4)
    return out


# ---- no Ray needed ------------------------------------------------------------------------------

def criteo_lines(n):
    return "".join("1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0a1b2c3d"] * 26) + "\n" for _ in range(n))


@pytest.mark.parametrize("case", ["truncated gzip", "not gzip", "out is a file"])
def test_convert_bad_input(capsys, tmp_path, case):
    source = tmp_path / ("day_0.tsv" if case == "out is a file" else "day_0.gz")
    packed = gzip.compress(criteo_lines(2000).encode())
    source.write_bytes({"truncated gzip": packed[: len(packed) // 2], "not gzip": criteo_lines(10).encode(),
                        "out is a file": criteo_lines(10).encode()}[case])
    out = tmp_path / "out"
    if case == "out is a file":
        out.write_text("not a directory")
    last = assert_one_line(*terarec(capsys, "data", "convert", "--in", str(source), "--out", str(out)))
    assert (str(out) if case == "out is a file" else str(source)) in last
    assert not list(tmp_path.rglob("*.parquet"))  # nothing half-written is left


def test_run_dir_uri_is_refused_before_anything_runs(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = terarec(capsys, "train", "--data", str(tiny), "--run-dir", "s3://bucket/run", *TINY_JOB)
    assert_one_line(code, output, "config field 'run_dir'", "s3://bucket/run")
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("data", ["foo://bucket/data", "hdfs://127.0.0.1:1/data"])
def test_unreadable_data_uri(capsys, tmp_path, data):
    assert_one_line(*terarec(capsys, "train", "--data", data, "--run-dir", str(tmp_path)), f"cannot list {data}/train")


def test_unreachable_ray_address_fails_in_seconds(tiny, tmp_path):
    """ray.init retries an address where nothing listens for minutes, then exits 15 (Ray 2.60). A process of its
    own: this one may be joined to the session's Ray already."""
    result = subprocess.run([sys.executable, "-m", "terarec.platform.cli", "train", "--data", str(tiny), "--run-dir",
                             str(tmp_path), "--set", "ray_address=127.0.0.1:1"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "RAY_ADDRESS": ""})
    assert_one_line(result.returncode, result.stdout + result.stderr, "ray_address 127.0.0.1:1: nothing answers there")


# ---- the session's local Ray (4 CPUs) ---------------------------------------------------------------

def test_a_job_the_cluster_can_never_hold_exits_at_once(capsys, ray_cluster, tiny, tmp_path):
    code, output = terarec(capsys, "train", "--data", str(tiny), "--run-dir", str(tmp_path), "--workers", "8",
                           "--steps", "2", "--batch-size", "240")
    assert_one_line(code, output, "workers=8 needs 1 CPU x 8 = 8 CPUs; the cluster has 4: lower workers or cpus_per_worker")


def test_a_waiting_job_says_pending_then_gives_up(capsys, ray_cluster, tiny, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    hold = placement_group([{"CPU": 3}])  # what another job would hold: 1 of the 4 CPUs stays free
    ray.get(hold.ready(), timeout=60)
    try:
        code, output = terarec(capsys, "train", "--data", str(tiny), "--run-dir", str(tmp_path), "--workers", "2",
                               "--set", "cpus_per_worker=1", "--set", "resource_timeout_s=9", *TINY_JOB[:4])
    finally:
        remove_placement_group(hold)
    # at most 1 CPU is free (other tests' actors may hold that one too)
    assert re.search(r"\[terarec\] pending: workers=2 needs 1 CPU x 2 = 2 CPUs; [01] free of the cluster's 4", output), output
    assert_one_line(code, output, "gave up after", "resource_timeout_s=9", str(tmp_path / "error.log"))
    assert "Traceback" in (tmp_path / "error.log").read_text() and (tmp_path / "ray.log").stat().st_size > 0


def break_parquet(source, target, how):
    shutil.copytree(source, target)
    path = sorted((target / "train").glob("*.parquet"))[0]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    else:
        pq.write_table(pq.read_table(path).drop(["C26"]), path)
    return path


def test_a_truncated_parquet_is_named_before_ray_starts(capsys, tiny, tmp_path):
    path = break_parquet(tiny, tmp_path / "data", "truncated")
    code, output = terarec(capsys, "train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
                           *TINY_JOB)
    assert_one_line(code, output, str(path), "is not a readable parquet file")


def test_a_missing_column_is_named(capsys, ray_cluster, tiny, tmp_path):
    """Found by the driver's column copies (made while Ray starts). A worker's own errors: see the pending test,
    a ResourceError raised inside Ray Train's controller and unwrapped to one line."""
    path = break_parquet(tiny, tmp_path / "data", "no C26")
    code, output = terarec(capsys, "train", "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
                           *TINY_JOB)
    assert_one_line(code, output, str(path), "no column 'C26'")
