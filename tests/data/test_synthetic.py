import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from torchrec_compress.data import SyntheticCTRConfig, SyntheticCTRDataset, check_batch, get_dataset
from torchrec_compress.data.schema import rank_batch_bounds

SMALL = SyntheticCTRConfig(
    num_dense=3,
    num_embeddings=(20, 1_000, 10**9),
    pooling=(1, 4, 1),
    train_rows=1_000,
    val_rows=301,
    test_rows=250,
    block_rows=128,
    seed=5,
)


def _rows(batches: list[Batch]) -> list[tuple]:
    """One hashable key per row: dense values, label and every feature's bag."""
    keys = []
    for batch in batches:
        bags = [
            [tuple(bag.tolist()) for bag in jagged.to_dense()]
            for jagged in batch.sparse_features.to_dict().values()
        ]
        for row in range(len(batch.labels)):
            keys.append(
                (tuple(batch.dense_features[row].tolist()), float(batch.labels[row]))
                + tuple(feature[row] for feature in bags)
            )
    return keys


@pytest.fixture(scope="module")
def dataset() -> SyntheticCTRDataset:
    return SyntheticCTRDataset(SMALL)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_ranks_partition_split_with_equal_batch_counts(
    dataset: SyntheticCTRDataset, split: str
) -> None:
    batch_size = 64
    single = _rows(list(dataset.batches(split, batch_size)))
    assert len(single) == dataset.num_rows(split)
    for world_size in (1, 2, 3):
        per_rank = [
            list(dataset.batches(split, batch_size, r, world_size)) for r in range(world_size)
        ]
        max_rows = math.ceil(dataset.num_rows(split) / world_size)
        expected_batches = math.ceil(max_rows / batch_size)
        assert [len(b) for b in per_rank] == [expected_batches] * world_size
        assert all(0 < len(b.labels) <= batch_size for rank in per_rank for b in rank)
        union = [row for rank in per_rank for row in _rows(rank)]
        assert Counter(union) == Counter(single)
        # Contiguous rank ranges: the ranks' streams, concatenated, are the 1-rank stream.
        assert union == single


def test_stream_independent_of_batch_size(dataset: SyntheticCTRDataset) -> None:
    assert _rows(list(dataset.batches("train", 7))) == _rows(list(dataset.batches("train", 300)))


def test_epoch_reshuffles_train_only(dataset: SyntheticCTRDataset) -> None:
    replayed = SyntheticCTRDataset(replace(SMALL, fresh_train_rows=False))
    epoch0 = _rows(list(replayed.batches("train", 100, epoch=0)))
    epoch1 = _rows(list(replayed.batches("train", 100, epoch=1)))
    assert epoch0 != epoch1 and Counter(epoch0) == Counter(epoch1)
    assert epoch0 == _rows(list(dataset.batches("train", 100, epoch=0)))
    assert _rows(list(dataset.batches("val", 100, epoch=0))) == _rows(
        list(dataset.batches("val", 100, epoch=3))
    )
    again = SyntheticCTRDataset(replace(SMALL, fresh_train_rows=False))
    assert _rows(list(again.batches("train", 100, epoch=1))) == epoch1
    other_seed = SyntheticCTRDataset(SyntheticCTRConfig(**{**SMALL.__dict__, "seed": 6}))
    assert _rows(list(other_seed.batches("test", 100))) != _rows(list(dataset.batches("test", 100)))


def test_batch_format_and_bags(dataset: SyntheticCTRDataset) -> None:
    batch = next(dataset.batches("train", 1_000))
    check_batch(batch, dataset.schema)
    sparse = batch.sparse_features
    assert sparse.keys() == ["f0", "f1", "f2"]
    assert sparse.lengths().dtype == torch.int32 and sparse.values().dtype == torch.int64
    assert sparse.weights_or_none() is None
    assert batch.dense_features.dtype == torch.float32 and batch.labels.dtype == torch.float32
    lengths = sparse.lengths().view(3, -1)
    assert bool((lengths[0] == 1).all()) and bool((lengths[2] == 1).all())
    assert set(lengths[1].unique().tolist()) == {0, 1, 2, 3, 4}  # multi-hot incl. empty bags


def test_zipf_ids_are_skewed_and_scattered() -> None:
    config = SyntheticCTRConfig(
        num_embeddings=(10_000, 10**9), pooling=(1, 1), train_rows=20_000, zipf_exponent=1.1
    )
    dataset = SyntheticCTRDataset(config)
    batch = next(dataset.batches("train", 20_000))
    check_batch(batch, dataset.schema)
    ids = batch.sparse_features["f0"].values()
    counts = torch.bincount(ids, minlength=10_000)
    top = counts.argsort(descending=True)[:100]
    # The 1% most popular ids carry a large share of lookups, and are not ids 0..99.
    assert counts[top].sum() > 0.4 * len(ids)
    assert int((top < 100).sum()) < 10
    huge = batch.sparse_features["f1"].values()
    assert int(huge.max()) > 10**8 and len(huge.unique()) < len(huge)


def test_teacher_signal_is_sparse_and_strong() -> None:
    dataset = get_dataset("synthetic", seed=1, test_rows=20_000)
    batches = list(dataset.batches("test", 10_000))
    labels = torch.cat([b.labels for b in batches]).long()
    teacher = torch.cat([dataset.teacher_logits(b) for b in batches])
    dense = torch.cat([b.dense_features for b in batches]).double()
    # A linear model of the dense features fit on these very rows (optimistic) stays near chance.
    design = torch.cat([dense, torch.ones(len(dense), 1, dtype=torch.float64)], dim=1)
    weights = torch.linalg.lstsq(design, labels.double().unsqueeze(1)).solution
    assert 0.2 < labels.float().mean() < 0.35
    assert binary_auroc(teacher, labels) > 0.85
    assert binary_auroc((design @ weights).squeeze(1), labels) < 0.56


def test_invalid_arguments() -> None:
    assert SyntheticCTRConfig(num_embeddings=[10], pooling=[2]).num_embeddings == (10,)
    with pytest.raises(ValueError, match="pooling has 1 entries"):
        SyntheticCTRConfig(num_embeddings=(10, 10), pooling=(1,))
    with pytest.raises(ValueError, match="feature 'f0' has 0 rows"):
        SyntheticCTRConfig(num_embeddings=(0,), pooling=(1,))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SyntheticCTRDataset(SMALL).num_rows("dev")
    with pytest.raises(ValueError, match="rank 2 gets 0 rows"):
        rank_batch_bounds(2, 4, rank=2, world_size=3)
    with pytest.raises(ValueError, match="unknown dataset 'avazu'"):
        get_dataset("avazu")
    with pytest.raises(ValueError, match="not read"):
        get_dataset("synthetic", path="/data")


def test_rank_batch_bounds_cover_split() -> None:
    for num_rows, batch_size, world_size in [(10, 4, 2), (7, 2, 3), (100, 33, 1), (0, 8, 2)]:
        bounds = [rank_batch_bounds(num_rows, batch_size, r, world_size) for r in range(world_size)]
        assert len({len(b) for b in bounds}) == 1
        assert bounds[0][0] == 0 and bounds[-1][-1] == num_rows
        for low, high in zip(bounds[:-1], bounds[1:], strict=True):
            assert low[-1] == high[0]
        assert all(np.all(np.diff(b) > 0) for b in bounds)


def test_train_epochs_stream_fresh_rows_by_default(dataset: SyntheticCTRDataset) -> None:
    """Production CTR training is one pass over fresh data: by default no train row repeats
    across epochs (the demo's second epoch re-read the first one's rows and overfitted)."""
    assert SyntheticCTRConfig().fresh_train_rows
    seen: set = set()
    for epoch in range(3):
        rows = _rows(list(dataset.batches("train", 100, epoch=epoch)))
        assert len(rows) == SMALL.train_rows
        assert not seen & set(rows), f"epoch {epoch} repeats rows"
        seen |= set(rows)
    # deterministic, and still independent of the world size
    assert _rows(list(SyntheticCTRDataset(SMALL).batches("train", 100, epoch=2))) == _rows(
        list(dataset.batches("train", 100, epoch=2))
    )
