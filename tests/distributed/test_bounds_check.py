"""Out-of-range ids raise in every sharded path, naming table, feature and id (1 and 2 gloo
processes, TorchRec's DLRM plain and AFM-compressed, every CPU sharding type).

fbgemm's default bounds check replaced such an id by 0 (``EmbeddingBoundsCheck ... Setting idx
to zero`` in the log) and training went on; only the CLI's own batch check protected it.
"""

import warnings
from typing import Any

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import AFMConfig, compress_
from torchrec_compress.distributed import shard_model
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")
BAD_ID = 10_000


def _bad_features(rank: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """A batch whose feature ``f<rank>`` holds id ``BAD_ID + rank`` (every rank has one, so
    each raises before any collective and the next case can run)."""
    batch = tiny_batch(8, seed=40 + rank, max_bag=3)
    kjt = batch.sparse_features
    values = kjt.values().clone()
    first = sum(kjt.length_per_key()[:rank])
    assert kjt.length_per_key()[rank] > 0
    values[first] = BAD_ID + rank
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    return batch.dense_features, bad


def _model(method: str, device: torch.device) -> torch.nn.Module:
    model = tiny_dlrm(device, seed=5).model
    if method == "afm":
        compress_(model, AFMConfig(rank=8), calibration=[tiny_batch(32, seed=1)])
    return model


def _forward_bad_ids(rank: int, world_size: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    dense, features = _bad_features(rank)
    errors: dict[str, Any] = {}
    for method in ("plain", "afm"):
        for sharding_type in SHARDING_TYPES:
            dmp = shard_model(
                _model(method, torch.device("cpu")), torch.device("cpu"), sharding_type
            )
            try:
                with torch.no_grad():
                    dmp(dense, features)
                errors[f"{method}/{sharding_type}"] = None
            except IndexError as e:
                errors[f"{method}/{sharding_type}"] = str(e)
    return errors


@pytest.mark.parametrize("world_size", [1, 2])
def test_out_of_range_ids_raise_naming_table_feature_and_id(world_size: int) -> None:
    for rank, errors in enumerate(run_multiprocess(_forward_bad_ids, world_size=world_size)):
        for case, error in errors.items():
            assert error is not None, f"rank {rank}, {case}: the id was accepted"
            expected = f"table 't_f{rank}', feature 'f{rank}': id {BAD_ID + rank} is outside"
            assert expected in error, (rank, case, error)
