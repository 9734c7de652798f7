"""A DCP checkpoint written by 2 processes loads into 1 process with identical predictions."""

from pathlib import Path

import torch

from examples.dlrm.train import (
    TrainConfig,
    attach_sparse_optimizer,
    build_optimizer,
    load_checkpoint,
    save_checkpoint,
)
from torchrec_compress.distributed import shard_model
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


def test_checkpoint_from_two_processes_loads_into_one(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_multiprocess(_train_and_save, world_size=2, path=path)
    # Predictions of the same eval batches agree on both ranks of the saving run.
    assert torch.allclose(torch.tensor(saved[0]), torch.tensor(saved[1]), atol=0, rtol=0)
    (loaded,) = run_multiprocess(_load_and_predict, world_size=1, path=path)
    diff = (torch.tensor(loaded) - torch.tensor(saved[0])).abs().max()
    assert diff <= 1e-6, f"max |diff| = {diff}"
