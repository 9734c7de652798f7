"""Fail loud: non-finite table rows are refused before compression (every method, local and
sharded), whether or not calibration looks them up."""

import re
import warnings
from typing import Any

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import AFMConfig, MECConfig, MECTraining, PQConfig, SVDConfig, compress_
from torchrec_compress.config import CompressionConfig
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.guards import first_nonfinite_row
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_dlrm

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS: dict[str, CompressionConfig] = {
    "afm": AFMConfig(rank=8),
    "svd": SVDConfig(rank=8),
    "mec": MECConfig(num_subspaces=4, num_centroids=16, training=MECTraining(steps=5)),
    "pq": PQConfig(num_subspaces=4, num_centroids=16),
    "int8": RowWiseQuantConfig(bits=8),
    "fp16": RowWiseQuantConfig(bits=16),
}
SHARDED = ("afm", "svd", "mec", "pq")  # the methods with a sharded route
BAD_ROW = 250  # of table t_f2 (300 rows); calibration looks up rows 0..9 only
EXPECTED = rf"table 't_f2': row {BAD_ROW} has NaN/inf values"


def _calibration(num: int = 2) -> list[Batch]:
    """Bags of 2 ids in rows 0..9 of every table: the bad row is never looked up."""
    out = []
    for seed in range(num):
        g = torch.Generator().manual_seed(seed)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1", "f2"],
            values=torch.randint(0, 10, (96,), generator=g),
            lengths=torch.full((48,), 2),
        )
        out.append(Batch(torch.randn(16, 5, generator=g), kjt, torch.zeros(16)))
    return out


def _poisoned_state(value: float) -> dict[str, torch.Tensor]:
    """TorchRec's DLRM with one NaN or inf value in row ``BAD_ROW`` of table ``t_f2``."""
    model = tiny_dlrm(torch.device("cpu"), seed=3).model
    with torch.no_grad():
        model.sparse_arch.embedding_bag_collection.embedding_bags["t_f2"].weight[BAD_ROW, 3] = value
    return model.state_dict()


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_nonfinite_row_is_refused_before_compression(method: str, value: float) -> None:
    """AFM passed a NaN row that calibration never looks up into its factor table; row-wise
    int8 / fp16 quantized it silently."""
    model = tiny_dlrm(torch.device("cpu"), seed=3).model
    model.load_state_dict(_poisoned_state(value))
    ebc = model.sparse_arch.embedding_bag_collection
    with warnings.catch_warnings(), pytest.raises(ValueError, match=EXPECTED):
        warnings.simplefilter("ignore")
        compress_(model, CONFIGS[method], calibration=_calibration())
    assert model.sparse_arch.embedding_bag_collection is ebc  # left unchanged


def _compress_sharded(rank: int, world_size: int) -> dict[str, Any]:
    """Every sharded method on a row-wise sharded DLRM whose bad row lives on the last rank."""
    warnings.simplefilter("ignore")
    state = _poisoned_state(float("nan"))
    errors: dict[str, Any] = {}
    for method in SHARDED:
        dmp = shard_model(
            tiny_dlrm(torch.device("meta"), seed=3).model, torch.device("cpu"), "row_wise"
        )
        load_full_state_dict_(dmp, state)
        try:
            compress_(dmp, CONFIGS[method], calibration=_calibration()[rank::world_size])
            errors[method] = None
        except ValueError as e:
            errors[method] = str(e)
    return errors


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_nonfinite_row_is_refused_by_every_sharded_method_on_every_process(
    world_size: int,
) -> None:
    """Sharded AFM passed the row; sharded SVD and MEC raised on the process holding it only,
    leaving the other blocked in a collective (or failing with 'Connection closed by peer')."""
    for rank, errors in enumerate(run_multiprocess(_compress_sharded, world_size=world_size)):
        for method in SHARDED:
            assert errors[method] is not None, (rank, method)
            assert re.search(EXPECTED, errors[method]), (rank, method, errors[method])


def test_first_nonfinite_row_skips_finite_chunks_by_their_sum_but_not_overflows() -> None:
    rows = torch.zeros(10, 4)
    assert first_nonfinite_row(rows, chunk_rows=3) is None
    # finite values whose float32 sum overflows: looked at row by row, still no bad row
    huge = torch.full((10, 4), 3e38)
    assert not torch.isfinite(huge[:3].sum())
    assert first_nonfinite_row(huge, chunk_rows=3) is None
    # +inf and -inf in one chunk sum to NaN; a NaN in a later chunk; bf16 rows
    for bad_row, values in ((4, (float("inf"), float("-inf"))), (8, (float("nan"), 0.0))):
        table = torch.zeros(10, 4, dtype=torch.bfloat16)
        table[bad_row, :2] = torch.tensor(values, dtype=torch.bfloat16)
        assert first_nonfinite_row(table, chunk_rows=3) == bad_row
        assert first_nonfinite_row(table.float(), chunk_rows=64) == bad_row


def test_an_out_of_range_id_is_refused_by_a_row_wise_int8_table() -> None:
    """fbgemm's int8 lookup replaced the id by 0 (``Setting idx to zero``) and went on."""
    model = tiny_dlrm(torch.device("cpu"), seed=3).model
    compress_(model, RowWiseQuantConfig(bits=8))
    batch = _calibration(1)[0]
    kjt = batch.sparse_features
    values = kjt.values().clone()
    values[-1] = 10_000
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    model(batch.dense_features, kjt)  # in range: fine
    with pytest.raises(RuntimeError, match="idx < num_rows"):
        model(batch.dense_features, bad)


@pytest.mark.parametrize("method", ["afm", "pq"])
def test_an_out_of_range_id_is_named_by_the_unsharded_compressed_collections(method: str) -> None:
    """Unsharded AFM raised torch's 'Index 7 of input takes value 10000 ...' and PQ its kernel's
    'id 10000 at position 13 ...': neither named the table or the feature."""
    model = tiny_dlrm(torch.device("cpu"), seed=3).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_(model, CONFIGS[method], calibration=_calibration())
    batch = _calibration(1)[0]
    kjt = batch.sparse_features
    values = kjt.values().clone()
    values[-1] = 10_000  # the last id belongs to feature f2 (table t_f2, 300 rows)
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    with pytest.raises(IndexError, match=r"table 't_f2', feature 'f2': id 10000 is outside"):
        model(batch.dense_features, bad)


def test_a_feature_read_by_two_tables_must_fit_the_smaller() -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_compress.guards import FeatureIdRanges

    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=r, feature_names=["f"])
        for n, r in (("small", 10), ("big", 100))
    ]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([3, 50]), lengths=torch.tensor([1, 1])
    )
    with pytest.raises(IndexError, match=r"table 'small', feature 'f': id 50 is outside"):
        FeatureIdRanges(tables).check(kjt)
