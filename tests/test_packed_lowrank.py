"""Any rank: factor tables whose rank is not a multiple of 4 are stored packed.

fbgemm's training kernels (behind every DMP-sharded table) need widths that are multiples of 4,
so AFM d=16 -> k=2 (the AFM paper's Criteo setting) was refused: ranks were always rounded up to
4.  With ``rank_multiple=1`` the rank is exact and the factor table stores ``4 / gcd(k, 4)`` factor
rows per row; the collection splits each feature into weighted slot features.  The sharded
counterparts are in ``tests/distributed/test_lowrank_embeddingbag.py`` and
``tests/distributed/test_compress_dmp.py``.
"""

import copy

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import AFMConfig, MECConfig, RowWiseQuantConfig, compress_
from torchrec_compress.methods.lowrank.module import (
    LowRankEmbeddingBagCollection,
    pack_factor_rows,
    unpack_factor_rows,
)
from torchrec_compress.methods.lowrank.rank import compressed_table_bytes
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=11, feature_names=["fa", "fs"]),
    EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=7, feature_names=["fb", "fs"]),
    EmbeddingBagConfig(
        name="c", embedding_dim=8, num_embeddings=5, feature_names=["fc"], pooling=PoolingType.MEAN
    ),
]
RANKS = {"a": 2, "b": 4, "c": 3}  # packed 2 to a row, plain, packed 4 to a row (MEAN)


def _batch(weighted: bool) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 0, 3, 1, 2, 0, 0, 1, 1, 3, 1, 2])
    values = torch.randint(0, 5, (int(lengths.sum()),), generator=g)
    weights = torch.rand(len(values), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["fa", "fs", "fb", "fc"], values=values, lengths=lengths, weights=weights
    )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_packed_tables_pool_exactly_like_their_rows(weighted: bool) -> None:
    torch.manual_seed(0)
    module = LowRankEmbeddingBagCollection(TABLES, RANKS, is_weighted=weighted)
    rows = {}
    for t in TABLES:
        k = RANKS[t.name]
        factors, projection = torch.randn(t.num_embeddings, k), torch.randn(k, t.embedding_dim)
        mean = torch.randn(t.embedding_dim)
        module.load_table_(t.name, factors, projection, mean)
        rows[t.name] = factors @ projection + mean
    assert module.factor_ebc.embedding_bags["a"].weight.shape == (6, 4)  # 11 rows, 2 to a row
    assert module.factor_ebc.embedding_bags["b"].weight.shape == (7, 4)
    assert module.factor_ebc.embedding_bags["c"].weight.shape == (2, 12)  # 5 rows, 4 to a row
    batch = _batch(weighted)
    with torch.no_grad():
        out = module(batch).to_dict()
    by_feature = batch.to_dict()
    for t in TABLES:
        for feature in t.feature_names:
            bags = by_feature[feature]
            offsets = bags.offsets()
            name = f"{feature}@{t.name}" if feature == "fs" else feature
            for b in range(3):
                ids = bags.values()[offsets[b] : offsets[b + 1]]
                w = (
                    bags.weights()[offsets[b] : offsets[b + 1]]
                    if weighted
                    else torch.ones(len(ids))
                )
                expected = (rows[t.name][ids] * w[:, None]).sum(0)
                if t.pooling == PoolingType.MEAN:
                    expected = expected / max(len(ids), 1)
                torch.testing.assert_close(out[name][b], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_packed_tables_in_half_precision_pool_like_float32(
    dtype: torch.dtype, weighted: bool
) -> None:
    """A bf16 / fp16 packed collection raised "Expected tensor for argument #1 'weight' to have
    the same type as ... 'per_sample_weights'" (its slot weights were float32)."""
    torch.manual_seed(0)
    module = LowRankEmbeddingBagCollection(TABLES, RANKS, is_weighted=weighted)
    for t in TABLES:
        k, d = RANKS[t.name], t.embedding_dim
        module.load_table_(
            t.name, torch.randn(t.num_embeddings, k), torch.randn(k, d), torch.randn(d)
        )
    half = copy.deepcopy(module).to(dtype)
    assert half.factor_ebc.embedding_bags["a"].weight.dtype == dtype
    batch = _batch(weighted)
    with torch.no_grad():
        expected, got = module(batch).values(), half(batch).values()
    assert got.dtype == torch.float32  # like TorchRec's EmbeddingBagCollection
    torch.testing.assert_close(got, expected, atol=0.05 * float(expected.abs().max()), rtol=0)


def test_pack_and_unpack_are_inverse() -> None:
    factors = torch.randn(13, 3)
    packed = pack_factor_rows(factors, 4)
    assert packed.shape == (4, 12)
    assert torch.equal(unpack_factor_rows(packed, 4, 13), factors)


def _dlrm_k2(rank_multiple: int) -> tuple[torch.nn.Module, object]:
    model = tiny_dlrm(torch.device("cpu"), dim=16, seed=1).model
    batches = [tiny_batch(16, seed=i) for i in range(3)]
    config = AFMConfig(rank=2, rank_multiple=rank_multiple)
    return model, compress_(model, config, calibration=batches)


def test_exact_rank_two_of_sixteen_is_packed_and_counted_at_its_true_size() -> None:
    _, default = _dlrm_k2(rank_multiple=4)
    assert {r.rank for r in default.rows} == {2}  # an explicit rank is never rounded
    model, report = _dlrm_k2(rank_multiple=1)
    assert {r.rank for r in report.rows} == {2}
    ebc = model.sparse_arch.embedding_bag_collection
    for row in report.rows:
        n, d = row.shape
        assert row.bytes_after == compressed_table_bytes(n, d, 2)
        assert ebc.factor_ebc.embedding_bags[row.name].weight.shape == ((n + 1) // 2, 4)
    # a 300 x 16 table at k=2: 19,200 -> 4 (150 x 4 + 2 x 16 + 16) = 2,592 bytes
    assert report.rows[2].bytes_after == 2592 and report.rows[2].bytes_before == 19200
    batch = tiny_batch(8, seed=50)
    with torch.no_grad():
        assert torch.isfinite(model(batch.dense_features, batch.sparse_features)).all()


@pytest.mark.parametrize(
    "second", [MECConfig(num_subspaces=2, num_centroids=4), RowWiseQuantConfig(bits=8)]
)
def test_packed_factor_tables_are_not_compressed_further_without_a_word(second: object) -> None:
    model, _ = _dlrm_k2(rank_multiple=1)
    with pytest.raises(ValueError, match=r"stored packed .* cannot be compressed further"):
        compress_(model, second, calibration=[tiny_batch(16, seed=0)])
