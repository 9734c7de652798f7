"""Rank selection: rounding, variance targets, overrides and the global byte budget."""

import pytest
import torch

from torchrec_compress.config import AFMConfig, LowRankOverride, SVDConfig
from torchrec_compress.rank import (
    TableSpectrum,
    compressed_table_bytes,
    rank_for_variance,
    round_rank,
    select_ranks,
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


def test_fixed_rank_and_overrides() -> None:
    config = SVDConfig(
        rank=5,
        table_overrides={"flat": LowRankOverride(skip=True), "small": LowRankOverride(rank=2)},
    )
    assert select_ranks(_spectra(), config) == {"steep": 8, "flat": None, "small": 4}


def test_variance_target_is_rounded() -> None:
    ranks = select_ranks(_spectra(), AFMConfig(explained_variance=0.9, rank_multiple=1))
    assert ranks == {"steep": 2, "flat": 15, "small": 7}  # small: 16/18 < 0.9 <= 17/18
    assert select_ranks(_spectra(), AFMConfig(explained_variance=0.9)) == {
        "steep": 4,
        "flat": 16,
        "small": 8,
    }


@pytest.mark.parametrize(
    "config,match",
    [
        (AFMConfig(rank=12), "table 'small': rank 12 is invalid; valid ranks are 1..8"),
        (
            AFMConfig(rank=4, table_overrides={"nope": LowRankOverride(rank=2)}),
            r"unknown table\(s\) \['nope'\]",
        ),
        (AFMConfig(memory_budget_bytes=1000), "smallest allowed ranks"),
    ],
)
def test_errors_name_the_problem(config: AFMConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_ranks(_spectra(), config)


@pytest.mark.parametrize("budget", [60_000, 100_000, 200_000, 10**9])
def test_budget_is_respected_and_spent_where_it_pays(budget: int) -> None:
    spectra = _spectra()
    ranks = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    used = sum(
        compressed_table_bytes(s.num_embeddings, s.embedding_dim, ranks[n])
        for n, s in spectra.items()
    )
    assert used <= budget
    assert all(r % 4 == 0 for r in ranks.values())
    # the flat table gains far more per rank beyond 4 than the steep one
    assert ranks["flat"] >= ranks["steep"]
    if budget == 10**9:
        assert ranks == {"steep": 16, "flat": 16, "small": 8}


def test_budget_charges_overridden_tables_first() -> None:
    spectra = _spectra()
    budget = 150_000
    free = select_ranks(spectra, AFMConfig(memory_budget_bytes=budget))
    pinned = select_ranks(
        spectra,
        AFMConfig(memory_budget_bytes=budget, table_overrides={"flat": LowRankOverride(rank=16)}),
    )
    assert pinned["flat"] == 16
    assert pinned["steep"] <= free["steep"]
    used = sum(
        compressed_table_bytes(s.num_embeddings, s.embedding_dim, pinned[n])
        for n, s in spectra.items()
    )
    assert used <= budget


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
