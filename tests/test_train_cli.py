"""`terarec train` end to end through the CLI, and what bad input gets."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "terarec.platform.cli"]


def terarec(*args, env=None, timeout=600):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    out = tmp_path_factory.mktemp("clicks")
    result = terarec("data", "synth", "--out", str(out), "--rows", "400000", "--seed", "1", "--cardinality-scale", "1e-4")
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.mark.slow
def test_dlrm_beats_logistic_regression(idle_ray_cluster, clicks, tmp_path):
    aucs, outputs = {}, {}
    for model, extra in (("dlrm", []), ("lr", ["--set", "dense_optimizer.lr=0.01"])):
        run_dir = tmp_path / model
        result = terarec("train", "--model", model, "--data", clicks, "--run-dir", str(run_dir), "--steps", "340",
                         "--batch-size", "1024", "--seed", "0", "--set", "eval_rows=20000", *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for key in ("auc", "logloss", "samples_per_s", "steps", "train_rows", "model", "time_to_first_step_s"):
            assert key in metrics
        assert 0 < metrics["time_to_first_step_s"] and "s after launch" in result.stdout + result.stderr
        assert metrics["steps"] == 340 and metrics["train_rows"] == 340 * 1024 and metrics["model"] == model
        assert (run_dir / "curve.jsonl").read_text().count("\n") >= 6
        assert (run_dir / "curve.png").stat().st_size > 1000
        aucs[model], outputs[model] = metrics["auc"], result.stdout
    # DLRM's sparse lr follows the data (its keys recur: 0.2) in one line; LR's is fixed
    assert "note: sparse lr 0.2 for dlrm: a training key recurs 2747 times on average" in outputs["dlrm"]
    assert "sparse lr" not in outputs["lr"]
    assert aucs["lr"] > 0.70, aucs
    assert aucs["dlrm"] > aucs["lr"] + 0.02, aucs


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "-5"], "config field 'batch_size': Input should be greater than 0"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--set", "embedding.dim=abc"], "config field 'embedding.dim'"),
    (["--set", "embedding.dimm=8"], "config field 'embedding.dimm': unknown key"),
    (["--set", "novalue"], "expected key=value"),
    (["--set", "workers=[3,2]"], "config field 'workers'"),
    (["--set", "store.kind=cached_ssd"], "needs store.path"),
    (["--config", "/nonexistent/job.yaml"], "config file /nonexistent/job.yaml does not exist"),
    (["--set", "launch=in_process", "--set", "workers=2"], "launch=in_process runs one worker in the driver"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, args, message):
    result = terarec("train", "--data", str(tmp_path), *args, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_one_worker_in_process_keeps_checkpoints_and_resumes(idle_ray_cluster, clicks, tmp_path):
    """launch=in_process (what `auto` picks for a one-worker job on its own Ray): the loop runs in the driver,
    writes its checkpoints where Ray Train would (the newest 3), and a resume continues from the latest."""
    from terarec.core.checkpoints import find_checkpoints

    run_dir = tmp_path / "run"
    common = ["--model", "dlrm", "--data", clicks, "--run-dir", str(run_dir), "--batch-size", "1024",
              "--set", "launch=in_process", "--set", "eval_rows=2000", "--set", "checkpoint_every=10"]
    result = terarec("train", *common, "--steps", "40")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["launch"] == "in_process" and metrics["startup_s"]["train_workers"] < 1.0
    assert sorted(find_checkpoints(str(run_dir))) == [20, 30, 40]
    assert metrics["checkpoint"] == find_checkpoints(str(run_dir))[40]
    assert "first step" in result.stdout
    assert "Reported metrics" not in result.stdout + result.stderr and "local mode" not in result.stdout + result.stderr
    result = terarec("train", *common, "--steps", "50", "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and json.loads((run_dir / "metrics.json").read_text())["steps"] == 50


def test_auto_launch_runs_in_process_only_when_actors_add_nothing(monkeypatch):
    from terarec.core.config import load_config
    from terarec.platform.runner import runs_in_process

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    decide = lambda *overrides: runs_in_process(load_config(overrides=list(overrides), flags={"data": "d"}))  # noqa: E731
    assert decide()
    assert not decide("workers=2") and not decide("max_failures=1") and not decide("launch=workers")
    assert not decide("ray_address=127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not decide() and decide("launch=in_process")


def test_bad_yaml_and_missing_data(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("model: [dlrm\n")
    result = terarec("train", "--config", str(bad), "--data", str(tmp_path))
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    result = terarec("train", "--data", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr
