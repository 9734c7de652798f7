import warnings

import pytest
import torch
import torchrec.fx
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.methods.pq import decode
from torchrec_compress.methods.pq.lookup import pq_pooled_lookup
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection


def _tables(pooling: PoolingType) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name="t_user",
            embedding_dim=8,
            num_embeddings=50,
            feature_names=["user", "friend"],
            pooling=pooling,
        ),
        EmbeddingBagConfig(
            name="t_item",
            embedding_dim=6,
            num_embeddings=30,
            feature_names=["item"],
            pooling=pooling,
        ),
    ]


def _pq_ebc(pooling: PoolingType, is_weighted: bool) -> PQEmbeddingBagCollection:
    gen = torch.Generator().manual_seed(0)
    codes = {
        "t_user": torch.randint(16, (50, 4), generator=gen, dtype=torch.uint8),
        "t_item": torch.randint(16, (30, 3), generator=gen, dtype=torch.uint8),
    }
    books = {
        "t_user": torch.randn(4, 16, 2, generator=gen),
        "t_item": torch.randn(3, 16, 2, generator=gen),
    }
    return PQEmbeddingBagCollection(_tables(pooling), codes, books, is_weighted=is_weighted)


def _float_ebc(
    pq: PQEmbeddingBagCollection, pooling: PoolingType, is_weighted: bool
) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(_tables(pooling), is_weighted=is_weighted)
    with torch.no_grad():
        for name, bag in ebc.embedding_bags.items():
            bag.weight.copy_(pq.decoded_weight(name))
    return ebc


def _features(weighted: bool) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(1)
    # batch 4; empty bags in every feature, multi-hot elsewhere
    lengths = torch.tensor([3, 0, 1, 5, 0, 2, 2, 0, 4, 4, 0, 1])
    maxima = torch.tensor([50] * 8 + [30] * 4).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=gen) * maxima).long()
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(["user", "friend", "item"], values, lengths, weights)


@pytest.mark.parametrize(
    "pooling,weighted",
    [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)],
)
def test_forward_matches_float_ebc_of_decoded_tables(pooling: PoolingType, weighted: bool) -> None:
    pq = _pq_ebc(pooling, weighted)
    ebc = _float_ebc(pq, pooling, weighted)
    features = _features(weighted)
    got, want = pq(features), ebc(features)
    assert got.keys() == want.keys() == ["user", "friend", "item"]
    assert got.length_per_key() == want.length_per_key() == [8, 8, 6]
    torch.testing.assert_close(got.values(), want.values(), atol=1e-6, rtol=1e-6)
    assert got.values()[1, :8].abs().sum() == 0  # empty bags pool to zero
    assert pq.embedding_bag_configs() is pq._embedding_bag_configs and pq.is_weighted() == weighted


def test_empty_batch_and_empty_feature() -> None:
    pq = _pq_ebc(PoolingType.SUM, False)
    features = KeyedJaggedTensor.from_lengths_sync(
        ["user", "friend", "item"],
        torch.tensor([], dtype=torch.long),
        torch.zeros(6, dtype=torch.long),
    )
    assert torch.equal(pq(features).values(), torch.zeros(2, 22))


def test_gradient_reaches_codebooks() -> None:
    pq = _pq_ebc(PoolingType.SUM, True)
    features = _features(True)
    upstream = torch.randn(4, 22, generator=torch.Generator().manual_seed(2))
    (pq(features).values() * upstream).sum().backward()
    # Reference: the same loss through the decoded table (decode is differentiable in codebooks).
    for name, books in pq.codebooks.items():  # [M * K, dsub]: a row per codeword
        ref_books = pq.codebook(name).detach().clone().requires_grad_()
        ebc = _float_ebc(pq, PoolingType.SUM, True)
        ref_pooled = {}
        weight = decode(getattr(pq.codes, name), ref_books)
        for feature in ebc._feature_names[[t.name for t in pq.embedding_bag_configs()].index(name)]:
            jt = features.to_dict()[feature]
            ref_pooled[feature] = torch.nn.functional.embedding_bag(
                jt.values(),
                weight,
                jt.offsets(),
                mode="sum",
                include_last_offset=True,
                per_sample_weights=jt.weights(),
            )
        offsets = {"user": 0, "friend": 8, "item": 16}
        loss = sum(
            (out * upstream[:, offsets[f] : offsets[f] + out.shape[1]]).sum()
            for f, out in ref_pooled.items()
        )
        loss.backward()
        assert books.grad is not None and books.grad.abs().sum() > 0
        torch.testing.assert_close(
            books.grad.view_as(ref_books), ref_books.grad, atol=1e-5, rtol=1e-5
        )
    assert not pq.codes.t_user.requires_grad


def test_codes_round_trip_through_state_dict() -> None:
    pq = _pq_ebc(PoolingType.SUM, False)
    state = pq.state_dict()
    assert state["codes.t_user"].dtype == torch.uint8 and state["codes.t_user"].shape == (50, 4)
    assert set(state) == {"codes.t_user", "codes.t_item", "codebooks.t_user", "codebooks.t_item"}
    other = PQEmbeddingBagCollection(
        _tables(PoolingType.SUM),
        {
            "t_user": torch.zeros(50, 4, dtype=torch.uint8),
            "t_item": torch.zeros(30, 3, dtype=torch.uint8),
        },
        {"t_user": torch.zeros(4, 16, 2), "t_item": torch.zeros(3, 16, 2)},
    )
    other.load_state_dict(state)
    features = _features(False)
    assert torch.equal(other(features).values(), pq(features).values())


def test_out_of_range_codes_on_load_name_the_table() -> None:
    pq = _pq_ebc(PoolingType.SUM, False)
    state = pq.state_dict()
    bad = state["codes.t_item"].clone()
    bad[3, 1] = 16  # K = 16
    state["codes.t_item"] = bad
    with pytest.raises(ValueError, match=r"table 't_item': codes must lie in \[0, 16\)"):
        pq.load_state_dict(state)


def test_bad_construction_names_the_table() -> None:
    tables = _tables(PoolingType.SUM)
    codes = {
        "t_user": torch.zeros(50, 4, dtype=torch.uint8),
        "t_item": torch.zeros(30, 3, dtype=torch.uint8),
    }
    books = {"t_user": torch.zeros(4, 16, 2), "t_item": torch.zeros(3, 16, 2)}
    with pytest.raises(ValueError, match=r"table 't_item': codebooks must be \[M, K, 6 / M\]"):
        PQEmbeddingBagCollection(tables, codes, {**books, "t_item": torch.zeros(4, 16, 2)})
    with pytest.raises(ValueError, match=r"table 't_user': codes must be \[50, 4\]"):
        PQEmbeddingBagCollection(
            tables, {**codes, "t_user": torch.zeros(49, 4, dtype=torch.uint8)}, books
        )
    with pytest.raises(ValueError, match=r"table 't_user': codes must lie in \[0, 16\)"):
        PQEmbeddingBagCollection(tables, {**codes, "t_user": torch.full((50, 4), 16)}, books)
    with pytest.raises(ValueError, match=r"table 't_item': codes and codebooks are both required"):
        PQEmbeddingBagCollection(tables, {"t_user": codes["t_user"]}, books)


def test_wide_codes_are_int16_and_int64_indices_agree() -> None:
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(300, (20, 2), generator=gen, dtype=torch.int16)
    books = torch.randn(2, 300, 3, generator=gen)
    ids, offsets = torch.tensor([1, 5, 5, 19]), torch.tensor([0, 3, 4])
    want = torch.nn.functional.embedding_bag(
        ids, decode(codes, books), offsets, mode="sum", include_last_offset=True
    )
    torch.testing.assert_close(pq_pooled_lookup(codes, books, ids, offsets), want)
    table = EmbeddingBagConfig(name="w", embedding_dim=6, num_embeddings=20, feature_names=["f"])
    pq = PQEmbeddingBagCollection([table], {"w": codes.int()}, {"w": books})
    assert pq.codes.w.dtype == torch.int16


@pytest.mark.parametrize("byte_offset", [0, 3])
def test_word_gather_path_matches_decode(byte_offset: int) -> None:
    # 8 uint8 codes per row are gathered as one int64 word; a view starting 3 bytes into its
    # storage cannot be read as words and takes the byte path.  Both must equal pooling the
    # decoded table.
    gen = torch.Generator().manual_seed(5)
    flat = torch.randint(256, (21 * 8 + byte_offset,), generator=gen, dtype=torch.uint8)
    codes = flat[byte_offset:].view(21, 8)
    books = torch.randn(8, 256, 2, generator=gen)
    ids, offsets = torch.tensor([0, 7, 19, 3]), torch.tensor([0, 1, 4])
    want = torch.nn.functional.embedding_bag(
        ids, decode(codes, books), offsets, mode="sum", include_last_offset=True
    )
    torch.testing.assert_close(pq_pooled_lookup(codes, books, ids, offsets), want)


class _Wrapper(torch.nn.Module):
    """fx traces modules from their parent (a KeyedTensor output is returned as its values)."""

    def __init__(self, pq: PQEmbeddingBagCollection) -> None:
        super().__init__()
        self.pq = pq

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.pq(features).values()


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_symbolic_trace_and_script_match_eager(pooling: PoolingType, weighted: bool) -> None:
    model = _Wrapper(_pq_ebc(pooling, weighted))
    features = _features(weighted)
    traced = torchrec.fx.symbolic_trace(model)
    scripted = torch.jit.script(traced)
    expected = model(features)
    for compiled in (traced, scripted):
        assert (compiled(features) - expected).abs().max() <= 1e-6
    books = model.pq.codebooks["t_user"]
    expected.sum().backward()
    grad, books.grad = books.grad.clone(), None
    scripted(features).sum().backward()
    assert grad.abs().max() > 0 and (books.grad - grad).abs().max() <= 1e-6


def test_missing_embedding_bags_name_the_pq_fpebc_sharder() -> None:
    pq = _pq_ebc(PoolingType.SUM, is_weighted=True)
    assert not hasattr(pq, "embedding_bags")
    with pytest.raises(AttributeError, match="t_user.*PQFeatureProcessedEmbeddingBagCollection"):
        pq.embedding_bags  # noqa: B018 - the attribute access is what is tested


def test_runs_unsharded_in_one_process_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _pq_ebc(PoolingType.SUM, is_weighted=False)(_features(False))
