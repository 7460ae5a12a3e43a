"""A run that watches itself: periodic evaluation, the best checkpoint, early stopping, lr schedules, and the
defaults and notes that fit a dataset's size."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from terarec.actors.train_worker import TrainWorker
from terarec.api.services.jobs import evaluations as job_evaluations
from terarec.core.checkpoints import read_meta
from terarec.core.config import ConfigError, load_config
from terarec.core.data.reader import count_rows, list_split_files
from terarec.core.data.schema import read_data_meta
from terarec.core.steering import (choose_sparse_lr, default_batch_size, fit_to_data, key_recurrence, lr_factor,
                                   plan_notes, sparse_lr_for)
from terarec.kernels.comm import LocalCommunicator

CLI = [sys.executable, "-m", "terarec.platform.cli"]


def worker_for(data: str, run_dir, model: str = "deepfm", **settings) -> TrainWorker:
    overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    config = load_config(flags={"data": data, "run_dir": str(run_dir), "model": model}, overrides=overrides)
    return TrainWorker(config, LocalCommunicator(), torch.device("cpu"))


def test_lr_factor_follows_the_formulas():
    config = load_config(flags={"data": "x"}, overrides=[
        "dense_optimizer.schedule={warmup_steps: 10, decay: linear, min_lr_ratio: 0.2}",
        "embedding.schedule={decay: cosine}", "steps=110"])
    linear, cosine = config.dense_optimizer.schedule, config.embedding.schedule
    assert lr_factor(linear, 0, 110) == pytest.approx(0.1)  # warmup: (step + 1) / 10
    assert lr_factor(linear, 9, 110) == pytest.approx(1.0)
    assert lr_factor(linear, 10, 110) == pytest.approx(1.0)
    assert lr_factor(linear, 60, 110) == pytest.approx(1 - 0.8 * 0.5)  # halfway through the decay
    assert lr_factor(cosine, 55, 110) == pytest.approx(0.5)
    assert lr_factor(cosine, 110, 110) == pytest.approx(0.0, abs=1e-12)
    step = load_config(flags={"data": "x"}, overrides=["dense_optimizer.schedule={decay: step, step_every: 30, gamma: 0.1}"])
    assert [lr_factor(step.dense_optimizer.schedule, s, 100) for s in (0, 29, 30, 61)] == pytest.approx([1, 1, 0.1, 0.01])


@pytest.mark.parametrize("overrides, message", [
    (["dense_optimizer.schedule.decay=step"], "decay 'step' needs step_every"),
    (["steps=10", "embedding.schedule.warmup_steps=10"], "embedding.schedule.warmup_steps (10) must be below steps"),
    (["eval_every=0", "keep_best=true"], "eval_every is 0, but keep_best and early_stopping need"),
    (["early_stopping={min_delta: 0.01}"], "config field 'early_stopping.patience': Field required"),
])
def test_bad_steering_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(flags={"data": "x"}, overrides=overrides)


def test_worker_sets_the_scheduled_learning_rates(synth_data, tmp_path):
    worker = worker_for(synth_data, tmp_path, steps=12, batch_size=256, eval_every=0, log_every=1,
                        dense_optimizer={"lr": 0.01, "schedule": {"warmup_steps": 4, "decay": "linear"}},
                        embedding={"lr": 0.1, "schedule": {"decay": "step", "step_every": 5, "gamma": 0.5}})
    seen = []
    worker.train(on_log=lambda log: seen.append((log.step, worker.optimizer.param_groups[0]["lr"],
                                                  worker.store.optimizer.lr)))
    for step, dense_lr, sparse_lr in seen:  # the log after step s shows the lr step s was taken with (index s - 1)
        index = step - 1
        expected_dense = 0.01 * ((index + 1) / 4 if index < 4 else 1 - (index - 4) / 8)
        assert dense_lr == pytest.approx(expected_dense), step
        assert sparse_lr == pytest.approx(0.1 * 0.5 ** (index // 5)), step
    assert len(seen) == 12


def test_evaluations_come_every_eval_every_steps_and_at_each_epochs_end(synth_data, tmp_path):
    steps_per_epoch = count_rows(list_split_files(synth_data, "train")) // 4096  # drop_last: whole batches
    assert steps_per_epoch % 3 != 0  # the epoch ends between two eval_every evaluations
    worker = worker_for(synth_data, tmp_path, steps=2 * steps_per_epoch + 1, batch_size=4096, eval_every=3,
                        eval_rows=1000, model="lr")  # the cadence does not depend on the model: the fastest one
    evaluated = []
    worker.train(on_eval=lambda step, metrics, is_best: evaluated.append(step))
    expected = [step for step in range(1, 2 * steps_per_epoch + 2)
                if step % 3 == 0 or step % steps_per_epoch == 0 or step == 2 * steps_per_epoch + 1]
    assert steps_per_epoch in evaluated and evaluated == expected


def test_early_stopping_stops_where_the_rule_says(synth_data, tmp_path):
    patience, min_delta = 2, 0.003
    worker = worker_for(synth_data, tmp_path, steps=400, batch_size=128, eval_every=5, eval_rows=1000,
                        early_stopping={"patience": patience, "min_delta": min_delta})
    curve = []
    worker.train(on_eval=lambda step, metrics, is_best: curve.append((step, metrics["auc"])))
    best, waited, expected_stop = -math.inf, 0, None
    for step, auc in curve:
        if auc > best + min_delta:
            best, waited = auc, 0
        else:
            waited += 1
            if waited == patience:
                expected_stop = step
                break
    assert expected_stop is not None and expected_stop < 400, curve
    assert worker.step == expected_stop == curve[-1][0]
    assert worker.stop_reason.startswith(f"early stopping at step {expected_stop}: eval AUC has not beaten")
    assert worker.final_metrics()["stopped_early"] == worker.stop_reason


def test_defaults_fit_the_data_and_notes_say_when_a_plan_is_off():
    assert default_batch_size(90_000, range(1, 2)) == 64
    assert default_batch_size(180_000, range(1, 2)) == 128
    assert default_batch_size(100_000_000, range(1, 2)) == 4096
    assert default_batch_size(90_000, range(1, 4)) == 60  # a multiple of 1, 2 and 3
    config = load_config(flags={"data": "x"})
    fitted = fit_to_data(config, 90_000)
    assert (fitted.batch_size, fitted.eval_every) == (64, 140)
    short = fit_to_data(load_config(flags={"data": "x", "batch_size": 4096}), 90_000)
    (note,) = plan_notes(short, 90_000, 10_000)
    assert note == ("short run: one epoch of 90000 rows is only 21 steps of batch 4096; batch_size=64 gives 1406 "
                    "updates per epoch")
    long = fit_to_data(load_config(flags={"data": "x", "batch_size": 1024, "steps": 300}, overrides=["eval_every=0"]), 90_000)
    (note,) = plan_notes(long, 90_000, 10_000)
    assert note.startswith("long run: 3.4 epochs with no evaluation until the end")
    assert plan_notes(fitted, 90_000, 10_000) == []
    (note,) = plan_notes(fit_to_data(config, 100_000_000), 100_000_000, 5_000_000)
    assert note.startswith("each evaluation reads 5000000 eval rows; eval_rows=1000000")


def test_the_sparse_lr_fits_how_often_keys_recur():
    # convert --min-count: 1000 rows x 2 features over (9 + 1) + (19 + 1) keys (one OOV key per feature)
    convert_meta = {"vocabulary_sizes": [9, 19], "min_count": 5}
    assert key_recurrence(convert_meta, 1000).times == pytest.approx(2000 / 30)
    # synth: one row draws one key per feature, whatever the distribution; many rows over 2 IDs see both
    synth_meta = {"cardinalities": {"C1": 2, "C2": 3}, "zipf_exponent": 1.1}
    assert key_recurrence(synth_meta, 1).distinct_keys == pytest.approx(2.0)
    assert key_recurrence(synth_meta, 10_000).distinct_keys == pytest.approx(5.0)
    assert key_recurrence({}, 1000) is None
    # clamped at the rare and frequent ends, log-log in between: the geometric means meet
    assert sparse_lr_for(0.05, 0.2, 10) == sparse_lr_for(0.05, 0.2, 150) == 0.05
    assert sparse_lr_for(0.05, 0.2, 1300) == sparse_lr_for(0.05, 0.2, 1e6) == 0.2
    assert sparse_lr_for(0.05, 0.2, (150 * 1300) ** 0.5) == pytest.approx(0.1)
    dlrm = load_config(flags={"data": "x", "model": "dlrm"})
    assert fit_to_data(dlrm, 1000, convert_meta).sparse_lr == 0.05  # 67 lookups per key: rare
    assert fit_to_data(dlrm, 2000, {"vocabulary_sizes": [0, 0]}).sparse_lr == 0.2  # 2000 per key: frequent
    note = choose_sparse_lr(dlrm, 1000, convert_meta).note("dlrm")
    assert note.startswith("sparse lr 0.05 for dlrm: a training key recurs 67 times on average (2000 lookups / 30 "
                           "distinct keys, meta.json's vocabulary sizes (min_count 5))")
    # the user's embedding.lr, another sparse optimizer, a model that does not opt in, or data that says nothing:
    # no choice
    for embedding in ({"lr": 0.3}, {"optimizer": "adam"}):
        assert choose_sparse_lr(dlrm.model_copy(update={"embedding": dlrm.embedding.model_copy(update=embedding)}),
                                1000, convert_meta) is None
    assert choose_sparse_lr(load_config(flags={"data": "x", "model": "deepfm"}), 1000, convert_meta) is None
    assert fit_to_data(dlrm, 1000, {}).sparse_lr == 0.2


def test_synth_key_recurrence_matches_the_keys_in_the_data(synth_data):
    """The distinct keys expected from synth's meta.json against those counted in its train split."""
    import pyarrow.parquet as pq

    from terarec.core.data.schema import SPARSE_COLUMNS

    files = list_split_files(synth_data, "train")
    table = pq.read_table(files, columns=list(SPARSE_COLUMNS))
    counted = sum(len(set(table.column(name).to_pylist())) for name in SPARSE_COLUMNS)
    expected = key_recurrence(read_data_meta(synth_data), count_rows(files)).distinct_keys
    assert expected == pytest.approx(counted, rel=0.03)


@pytest.mark.usefixtures("idle_ray_cluster")
def test_a_run_with_eval_every_keeps_the_best_checkpoint(synth_data, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([*CLI, "train", "--model", "deepfm", "--data", synth_data, "--run-dir", str(run_dir),
                             "--steps", "40", "--batch-size", "256", "--set", "eval_every=5", "--set", "keep_best=true",
                             "--set", "eval_rows=1000"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if "auc" in line]
    assert [line["step"] for line in evaluations] == list(range(5, 41, 5))
    for line in evaluations:
        assert line["eval_rows"] == 1000 and 0 < line["mean_pred"] < 1 and 0 < line["mean_label"] < 1
    best = max(evaluations, key=lambda line: line["auc"])  # the first of equal maxima, as the tracker keeps it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["best_step"], metrics["best_auc"]) == (best["step"], best["auc"])
    assert metrics["best_checkpoint"] == str(run_dir / "best")
    assert read_meta(metrics["best_checkpoint"])["step"] == best["step"]
    assert (run_dir / "curve.png").stat().st_size > 1000
    latest, best_view = job_evaluations(str(run_dir / "curve.jsonl"))  # what GET /v1/jobs/ID shows
    assert latest == evaluations[-1] and best_view == {"step": best["step"], "auc": best["auc"]}
    assert f"eval at step {best['step']}" in result.stdout + result.stderr


def test_deploy_best_without_a_kept_checkpoint_says_so(tmp_path):
    result = subprocess.run([*CLI, "deploy", "best", "--run-dir", str(tmp_path), "--name", "m"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2
    assert result.stderr.strip() == (f"terarec deploy: error: no best checkpoint in {tmp_path}: train with "
                                     f"keep_best=true (and eval_every > 0)")
