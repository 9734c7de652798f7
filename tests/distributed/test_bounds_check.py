"""Out-of-range ids raise in every sharded path, naming table, feature and id (1 and 2 gloo
processes, TorchRec's DLRM plain and AFM-compressed and TorchRec's feature-processed collection,
every CPU sharding type).

fbgemm's default bounds check replaced such an id by 0 (``EmbeddingBoundsCheck ... Setting idx
to zero`` in the log) and training went on; only the CLI's own batch check protected it.
"""

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import AFMConfig, compress_
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm, tiny_tables

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


class _PositionWeighted(nn.Module):
    """TorchRec's ``FeatureProcessedEmbeddingBagCollection`` (position weights) over the tiny
    tables, called like DLRM: ``model(dense, features)``."""

    def __init__(self) -> None:
        super().__init__()
        tables = tiny_tables()
        for table in tables:
            table.pooling = PoolingType.SUM
        self.fpebc = FeatureProcessedEmbeddingBagCollection(
            EmbeddingBagCollection(tables, is_weighted=True),
            PositionWeightedModuleCollection({f: 4 for t in tables for f in t.feature_names}),
        )

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.fpebc(features).values()


def _model(method: str) -> nn.Module:
    if method == "fp":
        return _PositionWeighted()
    model = tiny_dlrm(torch.device("cpu"), seed=5).model
    if method == "afm":
        compress_(model, AFMConfig(rank=8), calibration=[tiny_batch(32, seed=1)])
    return model


def _forward_bad_ids(rank: int, world_size: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    dense, features = _bad_features(rank)
    errors: dict[str, Any] = {}
    for method in ("plain", "afm", "fp"):
        for sharding_type in SHARDING_TYPES:
            dmp = shard_model(_model(method), torch.device("cpu"), sharding_type)
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
