"""LowRankEmbeddingBagCollection pools exactly in the low-rank space and is a drop-in EBC."""

from unittest.mock import patch

import pytest
import torch
from torchrec.models.dlrm import SparseArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import LowRankEmbeddingBagCollection
from torchrec_compress.methods.lowrank import kernels as _ops
from torchrec_compress.methods.lowrank.module import CompositeLowRankEmbeddingBagCollection


def _tables(pooling: PoolingType) -> list[EmbeddingBagConfig]:
    return [
        # two features share one table
        EmbeddingBagConfig(
            name="t0",
            embedding_dim=8,
            num_embeddings=20,
            feature_names=["f0", "f1"],
            pooling=pooling,
        ),
        # f2 is read by two tables (a shared feature: output keys "f2@t1", "f2@t2")
        EmbeddingBagConfig(
            name="t1", embedding_dim=12, num_embeddings=15, feature_names=["f2"], pooling=pooling
        ),
        EmbeddingBagConfig(
            name="t2",
            embedding_dim=4,
            num_embeddings=15,
            feature_names=["f2", "f3"],
            pooling=pooling,
        ),
    ]


def _features(weighted: bool, batch: int = 6) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(0)
    keys = ["f3", "f0", "extra", "f2", "f1"]  # not the EBC's order, plus a key no table reads
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    lengths[::5] = 0  # empty bags
    values = torch.randint(0, 15, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=values, lengths=lengths, weights=weights
    )


def _lowrank_and_reference(
    tables: list[EmbeddingBagConfig], ranks: dict[str, int], weighted: bool
) -> tuple[LowRankEmbeddingBagCollection, EmbeddingBagCollection]:
    """A low-rank EBC with random factors, and a plain EBC holding the rows A B + mu it encodes."""
    torch.manual_seed(1)
    module = LowRankEmbeddingBagCollection(tables, ranks, is_weighted=weighted)
    reference = EmbeddingBagCollection(tables, is_weighted=weighted)
    for t in tables:
        weight = reference.embedding_bags[t.name].weight
        if t.name not in ranks:
            module.load_table_(t.name, weight)
            continue
        k, d = ranks[t.name], t.embedding_dim
        factor, proj, mean = torch.randn(t.num_embeddings, k), torch.randn(k, d), torch.randn(d)
        module.load_table_(t.name, factor, proj, mean)
        with torch.no_grad():
            weight.copy_(factor @ proj + mean)
    return module, reference


@pytest.mark.parametrize(
    "pooling,weighted",
    [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)],
)
@pytest.mark.parametrize("ranks", [{"t0": 8, "t1": 12, "t2": 4}, {"t0": 3, "t1": 5}])
def test_pooling_is_exact_in_low_rank_space(
    pooling: PoolingType, weighted: bool, ranks: dict[str, int]
) -> None:
    tables = _tables(pooling)
    module, reference = _lowrank_and_reference(tables, ranks, weighted)
    features = _features(weighted)
    expected, actual = reference(features), module(features)
    assert actual.keys() == expected.keys() == ["f0", "f1", "f2@t1", "f2@t2", "f3"]
    assert actual.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(actual.values(), expected.values(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _ops.HAS_KERNELS, reason="C++ kernels not built")
@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize(
    "pooling,weighted",
    [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)],
)
@pytest.mark.parametrize("ranks", [{"t0": 8, "t1": 12, "t2": 4}, {"t0": 3, "t1": 5}])
def test_inference_kernel_gives_the_training_path_result(
    pooling: PoolingType, weighted: bool, ranks: dict[str, int], isa: str
) -> None:
    # with gradients the module pools through factor_ebc; without, through the fused kernel
    module, _ = _lowrank_and_reference(_tables(pooling), ranks, weighted)
    features = _features(weighted)
    expected = module(features)
    assert expected.values().requires_grad
    calls = []
    torch.ops.torchrec_compress.pq_set_kernel_isa(isa)
    try:
        with torch.no_grad(), patch.object(module.factor_ebc, "forward", side_effect=calls.append):
            actual = module(features)
    finally:
        torch.ops.torchrec_compress.pq_set_kernel_isa("auto")
    assert not calls, "the inference path must not run factor_ebc"
    assert actual.keys() == expected.keys()
    assert actual.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(actual.values(), expected.values().detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _ops.HAS_KERNELS, reason="C++ kernels not built")
def test_inference_path_sees_parameter_updates() -> None:
    # the inference path caches [B; mu] per table; an in-place update must not serve stale values
    module, _ = _lowrank_and_reference(_tables(PoolingType.SUM), {"t0": 8, "t1": 12}, False)
    features = _features(False)
    with torch.no_grad():
        before = module(features).values()
        module.projection["t0"].mul_(2.0)
        module.mean["t1"].add_(1.0)
        after = module(features).values()
        module.load_state_dict(module.state_dict())  # in-place copies: still consistent
        reloaded = module(features).values()
    expected = module(features).values().detach()  # gradients on: the factor_ebc path
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _ops.HAS_KERNELS, reason="C++ kernels not built")
def test_inference_kernel_names_an_out_of_range_id() -> None:
    module, _ = _lowrank_and_reference(_tables(PoolingType.SUM), {"t0": 4}, False)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2", "f3"],
        values=torch.tensor([1, 20, 3, 4]),
        lengths=torch.ones(4, dtype=torch.long),
    )
    # the module names table and feature before the kernel sees the id (it said "id 20 at
    # position 1")
    with torch.no_grad(), pytest.raises(IndexError, match="table 't0', feature 'f1': id 20 is"):
        module(features)


def test_plain_mean_would_be_wrong_for_multi_hot_bags() -> None:
    """Guards the bag coefficients: dropping them (a plain +mu per bag) must change SUM outputs."""
    tables = _tables(PoolingType.SUM)
    module, reference = _lowrank_and_reference(tables, {"t0": 2}, weighted=False)
    features = _features(False)
    with torch.no_grad():
        module.mean["t0"].zero_()
    diff = (module(features).to_dict()["f0"] - reference(features).to_dict()["f0"]).abs()
    assert diff.max() > 1e-2


def test_factor_tables_are_ordinary_k_dim_tables_and_configs_stay_original() -> None:
    tables = _tables(PoolingType.SUM)
    module = LowRankEmbeddingBagCollection(tables, {"t0": 4})
    assert isinstance(module.factor_ebc, EmbeddingBagCollection)
    dims = {t.name: t.embedding_dim for t in module.factor_ebc.embedding_bag_configs()}
    assert dims == {"t0": 4, "t1": 12, "t2": 4}
    assert [t.embedding_dim for t in module.embedding_bag_configs()] == [8, 12, 4]
    assert tuple(module.projection["t0"].shape) == (4, 8)
    assert set(module.projection) == set(module.mean) == {"t0"}


def test_gradients_reach_factors_projection_and_mean() -> None:
    module, _ = _lowrank_and_reference(_tables(PoolingType.SUM), {"t0": 4}, weighted=False)
    module(_features(False)).values().sum().backward()
    assert module.factor_ebc.embedding_bags["t0"].weight.grad is not None
    assert module.projection["t0"].grad.abs().sum() > 0
    assert module.mean["t0"].grad.abs().sum() > 0


def test_drop_in_for_dlrm_sparse_arch() -> None:
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=8, num_embeddings=10, feature_names=[f"f{i}"]
        )
        for i in range(2)
    ]
    module, reference = _lowrank_and_reference(tables, {"t0": 4, "t1": 8}, weighted=False)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 0, 1, 2])
    )
    out = SparseArch(module)(features)
    assert out.shape == (2, 2, 8)
    torch.testing.assert_close(out, SparseArch(reference)(features), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 9])
def test_invalid_rank_names_the_table(rank: int) -> None:
    with pytest.raises(ValueError, match="'t0'.*valid ranks are 1..8"):
        LowRankEmbeddingBagCollection(_tables(PoolingType.SUM), {"t0": rank})


def test_unknown_table_in_ranks() -> None:
    with pytest.raises(ValueError, match="unknown table.*'nope'"):
        LowRankEmbeddingBagCollection(_tables(PoolingType.SUM), {"nope": 2})


def test_mean_is_a_row_and_vector_means_of_older_checkpoints_load() -> None:
    module, _ = _lowrank_and_reference(_tables(PoolingType.SUM), {"t0": 4}, weighted=False)
    assert tuple(module.mean["t0"].shape) == (1, 8)  # 2-D, so row-wise optimizers apply
    features = _features(False)
    expected = module(features).values().detach()
    state = module.state_dict()
    older = {k: v.flatten() if k == "mean.t0" else v for k, v in state.items()}
    fresh = LowRankEmbeddingBagCollection(_tables(PoolingType.SUM), {"t0": 4})
    fresh.load_state_dict(older)
    torch.testing.assert_close(fresh(features).values().detach(), expected)


def test_swapping_in_a_non_ebc_factor_collection_gives_the_composite_type() -> None:
    module = LowRankEmbeddingBagCollection(_tables(PoolingType.SUM), {"t0": 4})
    # an EBC of factors keeps the type that TorchRec shards as one unit...
    assert type(module.with_factor_collection(module.factor_ebc)) is LowRankEmbeddingBagCollection
    # ...any other collection gets its own type, which DMP walks into
    composite = module.with_factor_collection(torch.nn.Identity())
    assert isinstance(composite, CompositeLowRankEmbeddingBagCollection)
