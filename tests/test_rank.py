"""Rank selection: rounding, variance targets, overrides and the global byte budget."""

import warnings

import pytest
import torch

from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride, SVDConfig
from torchrec_compress.methods.lowrank.rank import (
    RankChoice,
    TableSpectrum,
    choose_ranks,
    compressed_table_bytes,
    rank_for_variance,
    round_rank,
    select_ranks,
    table_bytes,
)


def _spectra() -> dict[str, TableSpectrum]:
    return {
        # variance concentrated in few directions: cheap to compress well
        "steep": TableSpectrum(1000, 16, torch.tensor([100.0 * 0.3**j for j in range(16)])),
        # flat spectrum: every rank buys the same
        "flat": TableSpectrum(1000, 16, torch.ones(16)),
        "small": TableSpectrum(50, 8, torch.tensor([5.0, 4, 3, 2, 1, 1, 1, 1])),
    }


def test_round_rank() -> None:
    assert [round_rank(k, 4, 16) for k in (1, 4, 5, 13, 16)] == [4, 4, 8, 16, 16]
    assert round_rank(3, 4, 2) == 2  # capped at the dimension
    assert round_rank(3, 1, 16) == 3


def test_rank_for_variance_smallest_reaching_target() -> None:
    eig = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert [rank_for_variance(eig, t) for t in (0.5, 0.8, 0.81, 1.0)] == [1, 2, 3, 4]
    assert rank_for_variance(torch.zeros(4), 0.9) == 1  # nothing to explain


def test_explicit_ranks_are_used_exactly() -> None:
    """A rank the user gives is not rounded to rank_multiple (it was: rank 2 of a 16-dim table
    stored rank 4, 4x instead of the ~8x asked, silently); packed factor rows store it."""
    config = SVDConfig(
        rank=5,
        table_overrides={"flat": LowRankOverride(skip=True), "small": LowRankOverride(rank=2)},
    )
    assert config.rank_multiple == 4
    assert select_ranks(_spectra(), config) == {"steep": 5, "flat": None, "small": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the rank asked is the rank stored
        choice = choose_ranks({"t": TableSpectrum(1000, 16, torch.ones(16))}, AFMConfig(rank=2))
    assert choice["t"] == RankChoice(2)
    assert table_bytes(1000, 16) / compressed_table_bytes(1000, 16, 2) > 7.5


def _used(spectra: dict[str, TableSpectrum], ranks: dict[str, int | None]) -> int:
    """Bytes after compression; a kept table (rank None) at its full size."""
    return sum(
        table_bytes(s.num_embeddings, s.embedding_dim)
        if ranks[n] is None
        else compressed_table_bytes(s.num_embeddings, s.embedding_dim, ranks[n])
        for n, s in spectra.items()
    )


def test_variance_target_is_rounded() -> None:
    # small: 16/18 < 0.9 <= 17/18 needs rank 7: 4 (50*7 + 7*8 + 8) = 1656 >= 1600 bytes: kept
    with pytest.warns(UserWarning, match=r"table 'small': explained_variance 0\.9: rank 7"):
        ranks = select_ranks(_spectra(), AFMConfig(explained_variance=0.9, rank_multiple=1))
    assert ranks == {"steep": 2, "flat": 15, "small": None}
    # rounded up to 16 = dim (flat) and 8 = dim (small): never smaller, so both kept
    with pytest.warns(UserWarning, match="keeps 2 table"):
        ranks = select_ranks(_spectra(), AFMConfig(explained_variance=0.9))
    assert ranks == {"steep": 4, "flat": None, "small": None}


def test_high_variance_target_keeps_every_table() -> None:
    """explained_variance=0.99 picked rank = dim everywhere: every table grew.  Now kept."""
    with pytest.warns(UserWarning, match="keeps 2 table"):
        choices = choose_ranks(_spectra(), AFMConfig(explained_variance=0.99))
    assert choices["steep"].rank == 4  # a steep spectrum still compresses
    assert choices["small"].rank is None
    assert choices["flat"] == RankChoice(
        None, "explained_variance 0.99: rank 16 would not be smaller (65088 >= 64000 bytes)"
    )


@pytest.mark.parametrize(
    "spec,rank,note",
    [
        # the cases: AFM rank 8 on a 6-row table; the demo's 50 x 64 table at rank 56
        (TableSpectrum(6, 16, torch.ones(16)), 8, "rank 8 would not be smaller (768 >= 384 bytes)"),
        (
            TableSpectrum(50, 64, torch.ones(64)),
            56,
            "rank 56 would not be smaller (25792 >= 12800 bytes)",
        ),
        (TableSpectrum(100, 8, torch.ones(8)), 12, "rank 12 exceeds embedding_dim 8"),
        (TableSpectrum(2, 16, torch.ones(16)), 1, "rank 1 would not be smaller (144 >= 128 bytes)"),
    ],
)
def test_a_rank_that_would_not_shrink_the_table_keeps_it(
    spec: TableSpectrum, rank: int, note: str
) -> None:
    spectra = {"big": TableSpectrum(1000, 64, torch.ones(64)), "t": spec}
    with pytest.warns(UserWarning, match=r"AFMConfig keeps 1 table\(s\) uncompressed: table 't'"):
        choices = choose_ranks(spectra, AFMConfig(rank=rank))
    assert choices["t"] == RankChoice(None, note)
    assert choices["big"].rank == rank


def test_every_chosen_rank_is_smaller_than_its_table() -> None:
    for rows in (1, 2, 3, 5, 8, 13, 50):
        for dim in (4, 8, 16, 64):
            spec = TableSpectrum(rows, dim, torch.linspace(2, 1, dim))
            for rank in range(1, dim + 3):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    k = select_ranks({"t": spec}, AFMConfig(rank=rank))["t"]
                if k is not None:
                    assert k <= min(rows, dim)
                    assert compressed_table_bytes(rows, dim, k) < table_bytes(rows, dim)


@pytest.mark.parametrize(
    "config,match",
    [
        (
            AFMConfig(rank=4, table_overrides={"small": LowRankOverride(rank=12)}),
            "table 'small': rank 12 is invalid; valid ranks are 1..8",
        ),
        (
            AFMConfig(rank=4, table_overrides={"nope": LowRankOverride(rank=2)}),
            r"unknown table\(s\) \['nope'\]",
        ),
    ],
)
def test_errors_name_the_problem(config: AFMConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_ranks(_spectra(), config)


@pytest.mark.parametrize("budget", [60_000, 100_000, 200_000, 10**9])
def test_budget_is_respected_and_spent_where_it_pays(budget: int) -> None:
    spectra = _spectra()
    ranks = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    assert _used(spectra, ranks) <= budget
    assert all(r is None or r % 4 == 0 for r in ranks.values())
    # the flat table gains far more per rank beyond 4 than the steep one
    assert (ranks["flat"] or 16) >= (ranks["steep"] or 16)
    if budget == 10**9:  # affords every table whole: nothing is compressed
        assert ranks == {"steep": None, "flat": None, "small": None}


def test_budget_keeps_tables_no_rank_shrinks() -> None:
    """`--budget-ratio 4` on a d=16 model raised: every 2-row table had to take rank >= 4."""
    spectra = {f"tiny{i}": TableSpectrum(2, 16, torch.ones(16)) for i in range(20)}
    spectra["big"] = TableSpectrum(5000, 16, torch.linspace(2, 1, 16))
    budget = sum(table_bytes(s.num_embeddings, s.embedding_dim) for s in spectra.values()) // 3
    with pytest.warns(
        UserWarning, match="table 'tiny0': smallest allowed rank 4 would not be smaller"
    ):
        choices = choose_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    assert all(choices[f"tiny{i}"].rank is None for i in range(20))
    assert choices["big"].rank is not None and choices["big"].rank < 16
    assert _used(spectra, {n: c.rank for n, c in choices.items()}) <= budget


def test_budget_charges_overridden_tables_first() -> None:
    spectra = _spectra()
    budget = 80_000
    free = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    pinned = select_ranks(
        spectra,
        AFMConfig(memory_budget_bytes=budget, table_overrides={"flat": LowRankOverride(rank=12)}),
    )
    assert pinned["flat"] == 12
    assert pinned["steep"] <= free["steep"]
    assert _used(spectra, pinned) <= budget


def _fields(num: int = 26, dim: int = 16) -> dict[str, TableSpectrum]:
    """A CTR model's fields: ``num`` tables of ``dim`` dims, 40 to ~40,000 rows."""
    eig = torch.tensor([1.0 / (j + 1) for j in range(dim)])
    return {
        f"t{i}": TableSpectrum(int(40 * 1.3**i), dim, eig, total_weight=1000.0) for i in range(num)
    }


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.3])
def test_budget_below_the_rounded_ranks_is_met_with_smaller_ranks(fraction: float) -> None:
    """A budget is a contract: 26 fields x d=16 at rank_multiple=4 ended at rank 4 everywhere
    whatever the budget (2.5x over a 10 % budget), with a warning.  Ranks below 4 (packed) fit."""
    spectra = _fields()
    whole = sum(table_bytes(s.num_embeddings, s.embedding_dim) for s in spectra.values())
    at_four = _used(spectra, {n: 4 for n in spectra})
    budget = int(fraction * whole)
    if budget < at_four:
        with pytest.warns(UserWarning, match="to meet the budget, tables .*'t25'"):
            ranks = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
        assert min(r for r in ranks.values() if r is not None) < 4
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ranks = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
        assert all(r is None or r % 4 == 0 for r in ranks.values())
    assert _used(spectra, ranks) <= budget


def test_budget_that_no_rank_meets_raises_naming_the_shortfall() -> None:
    spectra = _fields()
    whole = sum(table_bytes(s.num_embeddings, s.embedding_dim) for s in spectra.values())
    smallest = _used(spectra, {n: 1 for n in spectra})
    budget = int(0.02 * whole)
    assert budget < smallest
    with pytest.raises(
        ValueError,
        match=rf"memory_budget_bytes={budget} cannot be met: .* is {smallest} bytes .*'t25'",
    ):
        select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    ranks = select_ranks(spectra, AFMConfig(memory_budget_bytes=smallest))  # exactly enough
    assert ranks == {n: 1 for n in spectra}


def test_budget_counts_overridden_tables_in_the_shortfall() -> None:
    spectra = _spectra()
    pinned = compressed_table_bytes(1000, 16, 12)
    config = AFMConfig(
        memory_budget_bytes=pinned, table_overrides={"flat": LowRankOverride(rank=12)}
    )
    with pytest.raises(ValueError, match=f"{pinned} of them fixed by table_overrides"):
        select_ranks(spectra, config)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of rank, explained_variance"):
        AFMConfig(rank=4, explained_variance=0.9)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        AFMConfig(rank=0)
    with pytest.raises(ValueError, match="explained_variance must be in"):
        SVDConfig(explained_variance=1.5)
    with pytest.raises(ValueError, match="linear_rank, linear_variance"):
        AFMConfig(rank=4, linear=True)
    with pytest.raises(ValueError, match="exactly one of rank, explained_variance or skip"):
        LowRankOverride()
    config = AFMConfig(
        memory_budget_bytes=10**6,
        table_overrides={"t": LowRankOverride(skip=True)},
        linear=True,
        linear_variance=0.95,
    )
    assert AFMConfig.from_dict(config.to_dict()) == config


def test_rounded_ranks_are_what_fbgemm_training_kernels_accept() -> None:
    """The reason for rank_multiple=4: fbgemm's training TBE (sharded EBC) rejects other dims."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    def tbe(dim: int) -> SplitTableBatchedEmbeddingBagsCodegen:
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(10, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)]
        )

    with pytest.raises(Exception, match="multiple of 4"):
        tbe(3)
    out = tbe(round_rank(3, 4, 16))(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))
    assert out.shape == (2, 4)


def test_budget_follows_lookup_traffic() -> None:
    """Two identical spectra: the table looked up ten times as often earns the rank."""
    eig = torch.tensor([1.0 / (j + 1) for j in range(16)])
    spectra = {
        "busy": TableSpectrum(1000, 16, eig, total_weight=10_000.0),
        "quiet": TableSpectrum(1000, 16, eig, total_weight=1_000.0),
    }
    budget = compressed_table_bytes(1000, 16, 12) + compressed_table_bytes(1000, 16, 4)
    ranks = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    assert ranks == {"busy": 12, "quiet": 4}
