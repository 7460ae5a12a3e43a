"""Checkpoints: every zoo model's checkpoint loads into the inference path with the trained model's scores,
and a damaged or truncated file fails with one line naming it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from terarec.actors.embedding_server import EmbeddingShard
from terarec.actors.inference import model_from_checkpoint, score
from terarec.actors.train_worker import TrainWorker
from terarec.core.checkpoints import DENSE_FILE, find_checkpoint, open_checkpoint, shard_file
from terarec.core.config import TrainConfig
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.errors import CheckpointError
from terarec.kernels.comm import LocalCommunicator
from terarec.models import MODELS

SMALL = {"dlrm": {"bottom_mlp": [16], "top_mlp": [16, 1]}, "deepfm": {"deep_mlp": [16]},
         "xdeepfm": {"cin_layers": [4], "deep_mlp": [16]}, "dcn": {"cross_layers": 1, "deep_mlp": [16]},
         "dcnv2": {"cross_layers": 1, "deep_mlp": [16]}, "pnn": {"deep_mlp": [16]},
         "mmoe": {"num_experts": 2, "expert_mlp": [8], "tower_mlp": [8]}}


def trained_worker(name: str, data: str, run_dir) -> TrainWorker:
    config = TrainConfig(model=name, data=data, run_dir=str(run_dir), steps=4, batch_size=64,
                         embedding={"dim": 4, "num_buckets": 16}, models={name: SMALL.get(name, {})})
    worker = TrainWorker(config, LocalCommunicator(), torch.device("cpu"))
    worker.train()
    return worker


@pytest.fixture(scope="module")
def saved(synth_data, tmp_path_factory):
    """A trained DLRM checkpoint, written the way training writes it."""
    directory = tmp_path_factory.mktemp("ckpt")
    trained_worker("dlrm", synth_data, directory).save(str(directory))
    return str(directory)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_checkpoint_serves_the_trained_scores(name, synth_data, tmp_path):
    worker = trained_worker(name, synth_data, tmp_path)
    worker.save(str(tmp_path))
    with BatchReader(list_split_files(synth_data, "eval"), 128, epochs=1, shuffle=False) as reader:
        batch = next(iter(reader))
    worker.model.eval()
    offline = score(worker.model, batch.dense, batch.sparse)

    checkpoint = open_checkpoint(str(tmp_path))
    served = model_from_checkpoint(checkpoint, EmbeddingShard(str(tmp_path), rank=0, num_servers=1).store)
    assert torch.equal(score(served, batch.dense, batch.sparse), offline)
    assert offline.shape == (128, len(worker.label_columns))


def copy_of(saved: str, tmp_path) -> str:
    return shutil.copytree(saved, tmp_path / "copy")


def test_a_flipped_shard_fails_naming_the_file(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    shard = os.path.join(directory, shard_file(0, 1))
    data = bytearray(open(shard, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(b ^ 0xFF for b in data[middle:middle + 256])
    open(shard, "wb").write(bytes(data))
    checkpoint = open_checkpoint(directory)  # meta and dense.pt are intact
    with pytest.raises(CheckpointError, match=rf"{shard} is damaged or truncated") as error:
        checkpoint.load_rows()
    assert "\n" not in str(error.value)


def test_a_truncated_dense_file_fails_naming_it(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    dense = os.path.join(directory, DENSE_FILE)
    os.truncate(dense, os.path.getsize(dense) // 2)
    with pytest.raises(CheckpointError, match=rf"{dense} is damaged or truncated") as error:
        open_checkpoint(directory)
    assert "\n" not in str(error.value)


def test_a_missing_shard_or_meta_key_is_named(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    os.remove(os.path.join(directory, shard_file(0, 1)))
    with pytest.raises(CheckpointError, match="is missing"):
        open_checkpoint(directory).load_rows()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"step": 3}')
    with pytest.raises(CheckpointError, match="lacks world_size"):
        open_checkpoint(str(tmp_path / "other"))


def test_latest_is_the_highest_step(saved, tmp_path):
    run = tmp_path / "run"
    for step in (4, 12, 8):
        directory = run / "train-x" / f"checkpoint_{step:06d}"
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(saved, directory)
        meta = (directory / "meta.json").read_text().replace('"step": 4', f'"step": {step}', 1)
        (directory / "meta.json").write_text(meta)
    assert find_checkpoint(str(run), "latest").endswith("checkpoint_000012")
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        find_checkpoint(str(tmp_path / "empty"), "latest")


def test_resume_from_a_damaged_checkpoint_exits_2_naming_the_file(saved, synth_data, tmp_path):
    directory = copy_of(saved, tmp_path)
    shard = os.path.join(directory, shard_file(0, 1))
    data = bytearray(open(shard, "rb").read())
    data[-300:-44] = bytes(256)
    open(shard, "wb").write(bytes(data))
    result = subprocess.run([sys.executable, "-m", "terarec.platform.cli", "train", "--data", synth_data,
                             "--run-dir", str(tmp_path / "run"), "--resume", directory],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    assert shard in result.stderr and "damaged or truncated" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
