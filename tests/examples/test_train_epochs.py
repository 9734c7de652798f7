"""Fine-tuning reads fresh rows of a streaming dataset (issue 10).

The synthetic default streams: every train epoch is rows no earlier epoch read.  Fine-tuning
counted its epochs from 0 again, so it re-read the baseline's first epoch; now it reads the
dataset's epochs after the baseline's (``TrainConfig.data_epoch_offset``).
"""

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from examples.dlrm import train
from examples.dlrm.train import TrainConfig, train_epoch


class _Recording:
    """A dataset with no rows that records which epochs were asked for."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def num_rows(self, split: str) -> int:
        return 0

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[object]:
        self.epochs.append(epoch)
        return iter(())


def test_fine_tuning_epochs_read_the_dataset_after_the_baseline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(train.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train.dist, "all_reduce", lambda tensor: None)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _Recording()
    for epoch in range(2):
        train_epoch(model, optimizer, data, TrainConfig(), epoch)  # type: ignore[arg-type]
        train_epoch(model, optimizer, data, TrainConfig(data_epoch_offset=10), epoch)  # type: ignore[arg-type]
    assert data.epochs == [0, 10, 1, 11]
