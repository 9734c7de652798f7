"""A DCP checkpoint written by 2 processes loads into 1 process with identical predictions; a
damaged one is refused by every process, naming the file."""

import shutil
from pathlib import Path

import pytest
import torch

from examples.dlrm.train import (
    TrainConfig,
    attach_sparse_optimizer,
    build_optimizer,
    load_checkpoint,
    save_checkpoint,
)
from torchrec_compress.checkpoint import CheckpointError
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

EVAL_BATCHES = [tiny_batch(8, seed=1000 + i) for i in range(3)]


def _predict(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b)[1][1].flatten() for b in EVAL_BATCHES])


def _train_and_save(rank: int, world_size: int, path: str) -> list[float]:
    model = tiny_dlrm(torch.device("meta"))
    config = TrainConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.1)
    attach_sparse_optimizer(model, config)
    model = shard_model(model, torch.device("cpu"), sharding_type="table_wise")
    optimizer = build_optimizer(model, config)
    for step in range(3):  # a few real steps so the checkpoint is not the initialisation
        loss, _ = model(tiny_batch(8, seed=10 * step + rank))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(model, path, {"note": "test"})
    return _predict(model).tolist()


def _load_and_predict(rank: int, world_size: int, path: str) -> list[float]:
    model = shard_model(
        tiny_dlrm(torch.device("meta")), torch.device("cpu"), sharding_type="row_wise"
    )
    before = _predict(model)
    meta = load_checkpoint(model, path)
    assert meta["note"] == "test"
    after = _predict(model)
    assert not torch.allclose(before, after), "loading changed nothing"
    return after.tolist()


@pytest.fixture(scope="module")
def two_process_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[list[float]]]:
    """A checkpoint saved by 2 processes, and each rank's predictions when it was saved."""
    path = tmp_path_factory.mktemp("two") / "ckpt"
    return path, run_multiprocess(_train_and_save, world_size=2, path=str(path))


def test_checkpoint_from_two_processes_loads_into_one(
    two_process_checkpoint: tuple[Path, list[list[float]]],
) -> None:
    checkpoint, saved = two_process_checkpoint
    path = str(checkpoint)
    # Predictions of the same eval batches agree on both ranks of the saving run.
    assert torch.allclose(torch.tensor(saved[0]), torch.tensor(saved[1]), atol=0, rtol=0)
    (loaded,) = run_multiprocess(_load_and_predict, world_size=1, path=path)
    diff = (torch.tensor(loaded) - torch.tensor(saved[0])).abs().max()
    assert diff <= 1e-6, f"max |diff| = {diff}"


def _load_damaged(rank: int, world_size: int, path: str) -> str:
    model = shard_model(
        tiny_dlrm(torch.device("meta")), torch.device("cpu"), sharding_type="table_wise"
    )
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, path)
    return str(error.value)


def test_damaged_shard_of_a_two_process_checkpoint_is_refused_by_every_process(
    tmp_path: Path, two_process_checkpoint: tuple[Path, list[list[float]]]
) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(two_process_checkpoint[0], path)
    shard = path / "__1_0.distcp"  # written by rank 1
    shard.write_bytes(shard.read_bytes()[:-100])
    messages = run_multiprocess(_load_damaged, world_size=2, path=str(path))
    assert all("'__1_0.distcp' has" in m and "truncated" in m for m in messages), messages
