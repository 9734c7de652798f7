import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.data import CTRSchema, check_batch

SCHEMA = CTRSchema(dense_in_features=2, sparse_features=("user", "item"), num_embeddings=(10, 100))


def _batch(
    user_ids: list[int] | None = None,
    dense: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    keys: tuple[str, str] = ("user", "item"),
) -> Batch:
    user_ids = [1, 9, 0] if user_ids is None else user_ids
    sparse = KeyedJaggedTensor(
        keys=list(keys),
        values=torch.tensor(user_ids + [99, 5]),
        lengths=torch.tensor([1, len(user_ids) - 1, 0, 1, 0, 1], dtype=torch.int32),
    )
    return Batch(
        dense_features=torch.zeros(3, 2) if dense is None else dense,
        sparse_features=sparse,
        labels=torch.tensor([0.0, 1.0, 0.0]) if labels is None else labels,
    )


def test_valid_batch_passes() -> None:
    check_batch(_batch(), SCHEMA)
    check_batch(_batch(user_ids=[]), SCHEMA)  # empty bags everywhere in one feature


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            _batch(user_ids=[1, 10, 0]),
            r"feature 'user' \(table 't_user'\): id 10 is outside the valid range \[0, 10\)",
        ),
        (_batch(user_ids=[1, -3, 0]), r"feature 'user' \(table 't_user'\): id -3 is outside"),
        (_batch(dense=torch.zeros(3, 3)), r"shape \(3, 3\); expected \[batch, 2\]"),
        (
            _batch(dense=torch.tensor([[0.0, 0.0], [0.0, float("nan")], [0.0, 0.0]])),
            "NaN at row 1, column 1",
        ),
        (  # an inf passed: the loss became NaN and a run finished with val logloss nan
            _batch(dense=torch.tensor([[0.0, 0.0], [0.0, 0.0], [float("-inf"), 0.0]])),
            "dense_features has -inf at row 2, column 0",
        ),
        (_batch(labels=torch.tensor([0.0, 0.5, 1.0])), "label 0.5 at row 1 is not 0 or 1"),
        (_batch(labels=torch.zeros(2)), r"labels has shape \(2,\); expected \[3\]"),
        (_batch(keys=("item", "user")), r"keys \('item', 'user'\); expected \('user', 'item'\)"),
        (_batch(dense=torch.zeros(3, 2, dtype=torch.int64)), "floating point"),
    ],
)
def test_invalid_batches_are_named(batch: Batch, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_batch(batch, SCHEMA)


def test_item_range_checked_independently() -> None:
    schema = CTRSchema(2, ("user", "item"), (10, 99))
    with pytest.raises(ValueError, match=r"feature 'item' \(table 't_item'\): id 99 .*\[0, 99\)"):
        check_batch(_batch(), schema)


def test_schema_validation() -> None:
    assert SCHEMA.table_names == ("t_user", "t_item")
    with pytest.raises(ValueError, match="dense_in_features must be >= 1"):
        CTRSchema(0, ("a",), (1,))
    with pytest.raises(ValueError, match="2 sparse_features but 1 num_embeddings"):
        CTRSchema(1, ("a", "b"), (1,))
    with pytest.raises(ValueError, match="duplicates"):
        CTRSchema(1, ("a", "a"), (1, 1))
