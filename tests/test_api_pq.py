"""compress_ with MECConfig on a torchrec DLRM: quality, exact kept tables, report, atomic failure."""

import copy
import math

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.api import compress_
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
from torchrec_compress.methods.pq.config import MECConfig, MECOverride, MECTraining
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection

ROWS = {"t0": 300, "t1": 120, "t2": 40}
DIM = 8
# Small and fast: K=16 codewords of 2 dims in 4 subspaces.
_FAST = dict(
    num_subspaces=4,
    num_centroids=16,
    training=MECTraining(steps=20, sample_size=256, validation_size=512),
)


# one intra-op thread for every test of this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _dlrm() -> DLRM:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=[f"f{i}"])
        for i, (n, r) in enumerate(ROWS.items())
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=4,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[16, 1],
    )


def _batches(num: int = 4, batch_size: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    limits = torch.tensor(list(ROWS.values())).repeat_interleave(batch_size)
    for _ in range(num):
        lengths = torch.randint(1, 4, (3 * batch_size,), generator=g)
        # Zipf-like ids: rows near 0 are popular.
        u = torch.rand(int(lengths.sum()), generator=g)
        ids = (u**3 * limits.repeat_interleave(lengths)).long()
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1", "f2"], values=ids, lengths=lengths
        )
        out.append(Batch(torch.randn(batch_size, 4, generator=g), sparse, torch.zeros(batch_size)))
    return out


def _ebc(model: DLRM) -> nn.Module:
    return model.sparse_arch.embedding_bag_collection


def test_mec_dlrm_tables_are_quantized_and_reported() -> None:
    model, batches = _dlrm(), _batches()
    original = {t: w.detach().clone() for t, w in _ebc(model).state_dict().items()}
    config = MECConfig(**_FAST, table_overrides={"t2": MECOverride(skip=True)})
    report = compress_(model, config, calibration=batches)
    pq = _ebc(model)
    assert isinstance(pq, PQEmbeddingBagCollection)
    by_name = {r.name: r for r in report.rows}
    for name, rows in ROWS.items():
        decoded = pq.decoded_weight(name)
        weight = original[f"embedding_bags.{name}.weight"]
        error = ((decoded - weight).pow(2).mean() / weight.pow(2).mean()).item()
        row = by_name[name]
        if name == "t2":  # skipped: stored exactly
            assert row.method == "kept" and row.rank is None and row.perplexity is None
            torch.testing.assert_close(decoded, weight)
            assert row.bytes_after == row.bytes_before == rows * DIM * 4  # no codes held
        else:
            assert row.method == "MEC" and row.rank == 4 and row.explained_variance is None
            assert error < 0.5  # 16 codewords of 2 dims fit random 8-dim rows coarsely
            assert row.bytes_after == rows * 4 + 4 * 16 * 2 * 4 < row.bytes_before
            assert 8.0 <= row.perplexity <= 16.0
    assert "perplexity" in str(report) and "MEC" in str(report)
    with torch.no_grad():
        out = model(batches[0].dense_features, batches[0].sparse_features)
    assert out.shape == (32, 1) and bool(torch.isfinite(out).all())
    assert model.training


def test_pq_mode_and_counts_weigh_in() -> None:
    # The same model quantized with and without calibration counts gives different codes:
    # the counts reach the per-table training.
    codes = []
    for weighting in (True, False):
        model = _dlrm()
        config = MECConfig(**_FAST, mode="pq", popularity_weighting=weighting)
        report = compress_(model, config, calibration=_batches() if weighting else None)
        assert {r.method for r in report.rows} == {"PQ"}
        codes.append(_ebc(model).codes.t0.clone())
    assert not torch.equal(codes[0], codes[1])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "damage", "match"),
    [
        (
            MECConfig(**_FAST, table_overrides={"t0": MECOverride(num_subspaces=3)}),
            None,
            r"table 't0'.*not divisible by",
        ),
        (
            MECConfig(**_FAST, table_overrides={"t1": MECOverride(num_centroids=2**31 + 1)}),
            None,
            r"table 't1': override gives MECConfig.num_centroids must be <= 2\*\*31",
        ),
        (MECConfig(**_FAST), "nan", r"table 't2': row 7 has NaN"),
        (MECConfig(**_FAST, table_overrides={"nope": MECOverride(skip=True)}), None, "nope"),
        (MECConfig(**_FAST), "calibration", "needs calibration"),
    ],
)
def test_failures_name_the_table_and_leave_the_model_unchanged(
    config: MECConfig, damage: str | None, match: str
) -> None:
    model = _dlrm()
    if damage == "nan":
        with torch.no_grad():
            _ebc(model).embedding_bags["t2"].weight[7, 3] = math.nan
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        compress_(model, config, calibration=None if damage == "calibration" else _batches())
    assert isinstance(_ebc(model), EmbeddingBagCollection)
    torch.testing.assert_close(_state(model), before, rtol=0, atol=0, equal_nan=True)


def test_empty_table_is_named() -> None:
    ebc = EmbeddingBagCollection(
        [
            EmbeddingBagConfig(
                name="void",
                embedding_dim=8,
                num_embeddings=0,
                feature_names=["f"],
                weight_init_min=0.0,
                weight_init_max=0.0,
            )
        ]
    )
    model = nn.Sequential(ebc)
    with pytest.raises(ValueError, match=r"table 'void': cannot quantize an empty table"):
        compress_(model, MECConfig(**_FAST, popularity_weighting=False))
    assert model[0] is ebc


def _lowrank_then(
    config: MECConfig, rank: int = 4, distinct_rows: int | None = None
) -> tuple[DLRM, DLRM, list[Batch]]:
    """A DLRM compressed by AFM (``rank``), its copy, and the same then quantized by ``config``
    (with ``distinct_rows``, every table repeats that many distinct rows)."""
    model = _dlrm()
    if distinct_rows is not None:
        with torch.no_grad():
            for bag in _ebc(model).embedding_bags.values():
                bag.weight.copy_(bag.weight[torch.arange(len(bag.weight)) % distinct_rows])
    batches = _batches()
    compress_(model, AFMConfig(rank=rank), calibration=batches)
    lowrank = copy.deepcopy(model)
    report = compress_(model, config, calibration=batches)
    assert [r.shape for r in report.rows] == [(n, rank) for n in ROWS.values()]
    return lowrank, model, batches


def test_mec_on_lowrank_factors_is_exact_when_codewords_cover_the_rows() -> None:
    # K >= distinct rows: each subspace gets a codeword per distinct row, so quantization is
    # lossless and the model must equal the low-rank one; a projection not reordered like the
    # factor columns (the columns are reordered by variance) would break that.  (K >= rows
    # would be lossless too, but never smaller: such tables are kept.)
    lowrank, model, batches = _lowrank_then(
        MECConfig(num_subspaces=2, num_centroids=16, mode="pq"), distinct_rows=8
    )
    ebc = _ebc(model)
    assert isinstance(ebc, LowRankEmbeddingBagCollection)
    assert isinstance(ebc.factor_ebc, PQEmbeddingBagCollection)
    orders = [
        torch.linalg.lstsq(_ebc(lowrank).projection[n].T, ebc.projection[n].T).solution.T.round()
        for n in ROWS
    ]
    assert any(not torch.equal(o, torch.eye(4)) for o in orders), "no column was reordered"
    model.eval()
    lowrank.eval()
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(
                model(batch.dense_features, batch.sparse_features),
                lowrank(batch.dense_features, batch.sparse_features),
                atol=1e-5,
                rtol=1e-5,
            )


def test_mec_on_lowrank_factors_reports_factor_bytes_and_trains() -> None:
    lowrank, model, _ = _lowrank_then(MECConfig(**{**_FAST, "num_subspaces": 2}))
    # codebooks are trainable, the projection too; codes are a buffer
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".factor_ebc.codebooks." in n for n in names)
    assert any(".projection." in n for n in names)
    assert not any(".factor_ebc.embedding_bags." in n for n in names)


def test_mec_on_lowrank_factors_keeps_them_when_m_does_not_divide_the_rank() -> None:
    model = _dlrm()
    compress_(model, AFMConfig(rank=4), calibration=_batches())
    before = _state(model)
    with pytest.warns(UserWarning, match="table 't0': num_subspaces 3 does not divide"):
        report = compress_(
            model, MECConfig(**{**_FAST, "num_subspaces": 3}), calibration=_batches()
        )
    assert {r.method for r in report.rows} == {"kept"}
    assert not isinstance(_ebc(model).factor_ebc, PQEmbeddingBagCollection)
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reports_follow_a_table_through_both_stages() -> None:
    model = _dlrm()
    first = compress_(model, AFMConfig(rank=4), calibration=_batches())
    second = compress_(model, MECConfig(**{**_FAST, "num_subspaces": 2}), calibration=_batches())
    both = first.followed_by(second)
    assert [r.method for r in both.rows] == ["AFM+MEC"] * 3
    assert both.bytes_before == first.bytes_before == sum(ROWS.values()) * DIM * 4
    projection_and_mean = 3 * (4 * DIM + DIM) * 4
    assert both.bytes_after == second.bytes_after + projection_and_mean


def _tiny_and_large() -> nn.Sequential:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="tiny", embedding_dim=16, num_embeddings=6, feature_names=["a"]),
        EmbeddingBagConfig(name="large", embedding_dim=16, num_embeddings=400, feature_names=["b"]),
    ]
    return nn.Sequential(EmbeddingBagCollection(tables))


def _lookups() -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (2 * 16,), generator=g)
    limits = torch.tensor([6, 400]).repeat_interleave(16).repeat_interleave(lengths)
    ids = (torch.rand(int(lengths.sum()), generator=g) * limits).long()
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=ids, lengths=lengths)


def _table_bytes(module: nn.Module, table: str) -> int:
    """What the module holds for ``table``: every parameter and buffer named after it."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in tensors if n.endswith(f".{table}"))


def test_a_tiny_table_kept_in_a_quantized_collection_is_not_stored_larger() -> None:
    """A 6 x 16 table that PQ keeps was stored as 384 bytes of rows plus 6 of identity codes
    (390 > 384; a 400-row table kept by an override: +800 bytes of int16 codes)."""
    model = _tiny_and_large()
    expected = model[0](_lookups()).to_dict()["a"]
    with pytest.warns(UserWarning, match="table 'tiny'"):
        report = compress_(model, MECConfig(**_FAST, popularity_weighting=False))
    pq = model[0]
    assert isinstance(pq, PQEmbeddingBagCollection) and pq.stored_exactly() == ["tiny"]
    tiny = {r.name: r for r in report.rows}["tiny"]
    assert tiny.method == "kept" and tiny.bytes_after == tiny.bytes_before == 6 * 16 * 4
    assert _table_bytes(pq, "tiny") == 6 * 16 * 4
    torch.testing.assert_close(pq(_lookups()).to_dict()["a"], expected)  # exactly its rows

    # state dicts still carry its identity codes (sharded collections load them) and round-trip,
    # into a collection built like restore_layout_ builds one (zero codes) too
    state = pq.state_dict()
    assert list(state) == ["codes.tiny", "codes.large", "codebooks.tiny", "codebooks.large"]
    assert torch.equal(state["codes.tiny"][:, 0].long(), torch.arange(6))
    codes = {n: torch.zeros_like(state[f"codes.{n}"]) for n in ("tiny", "large")}
    books = {n: torch.zeros_like(state[f"codebooks.{n}"]) for n in ("tiny", "large")}
    restored = PQEmbeddingBagCollection(pq.embedding_bag_configs(), codes, books)
    assert restored.stored_exactly() == []
    restored.load_state_dict(state)
    assert restored.stored_exactly() == ["tiny"] and _table_bytes(restored, "tiny") == 384
    torch.testing.assert_close(restored(_lookups()).values(), pq(_lookups()).values())
    # codes that are not the row ids make it an ordinary quantized table again
    state["codes.tiny"] = state["codes.tiny"].flip(0)
    restored.load_state_dict(state)
    assert restored.stored_exactly() == []
    torch.testing.assert_close(restored.decoded_weight("tiny"), pq.decoded_weight("tiny").flip(0))
