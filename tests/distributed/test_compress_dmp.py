"""``compress_`` of a ``DistributedModelParallel`` model, and its one next call, ``reshard``.

TorchRec's own ``DLRM`` is sharded by DMP on 1 and 2 gloo processes, compressed with the same
verb as a plain model (every method), and ``report.reshard(device)`` re-plans, re-shards
(differently from the original) and loads the compressed model.  Its outputs must equal those of
``compress_`` applied to the same weights unsharded, with the union of all processes' batches.
Before this, ``compress_`` on a DMP model raised ``TypeError`` naming two method-specific verbs.
"""

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import (
    AFMConfig,
    KMeansTraining,
    MECConfig,
    MECTraining,
    PQConfig,
    SVDConfig,
    compress_,
)
from torchrec_compress.config import CompressionConfig
from torchrec_compress.distributed.compression import ShardedCompressionReport
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

CPU, META = torch.device("cpu"), torch.device("meta")
CALIBRATION_SEEDS = (300, 301)
EVAL = [tiny_batch(8, seed=700 + i) for i in range(2)]
# name -> (config, sharding of the original, sharding of the compressed model, module type)
CASES: dict[str, tuple[CompressionConfig, str, str, type[nn.Module]]] = {
    "afm": (AFMConfig(rank=8), "table_wise", "row_wise", LowRankEmbeddingBagCollection),
    "svd": (SVDConfig(rank=8), "column_wise", "table_wise", LowRankEmbeddingBagCollection),
    # exact rank 2 (fbgemm needs widths that are multiples of 4): stored packed, 2 rows to a row
    "afm_k2": (
        AFMConfig(rank=2, rank_multiple=1),
        "table_wise",
        "row_wise",
        LowRankEmbeddingBagCollection,
    ),
    "mec": (
        MECConfig(num_subspaces=4, num_centroids=16, training=MECTraining(steps=20)),
        "row_wise",
        "table_wise",
        PQEmbeddingBagCollection,
    ),
    # K=64 quantizes the 97- and 300-row tables and keeps the 64-row one: stored exactly
    # (identity codes) inside the quantized collection, as the local driver does (refused before)
    "pq_keeps_small": (
        PQConfig(num_subspaces=4, num_centroids=64),
        "row_wise",
        "table_wise",
        PQEmbeddingBagCollection,
    ),
    "pq": (
        PQConfig(num_subspaces=4, num_centroids=16),
        "table_wise",
        "row_wise",
        PQEmbeddingBagCollection,
    ),
}
LARGE_ROWS = 70_000  # more than k-means' sample (KMeansTraining.kmeans_sample_size, 65,536)


def _dlrm(device: torch.device) -> DLRM:
    """TorchRec's DLRM (not a project model): ``model(dense, sparse) -> logits``."""
    return tiny_dlrm(device, seed=11).model


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b.dense_features, b.sparse_features).flatten() for b in EVAL])


def _large_table_pq(rank: int, world_size: int) -> float:
    """PQ of a table larger than k-means' sample, sharded row-wise and unsharded: the two drivers
    draw the same sample with the same seed, so the pooled outputs are equal (before: the sharded
    driver seeded its sample by the table's index and the local one shared k-means' generator)."""
    table = EmbeddingBagConfig(
        name="big", embedding_dim=8, num_embeddings=LARGE_ROWS, feature_names=["f"]
    )
    g = torch.Generator().manual_seed(3)
    batches = [
        KeyedJaggedTensor.from_lengths_sync(
            keys=["f"],
            values=torch.randint(LARGE_ROWS, (64,), generator=g),
            lengths=torch.full((32,), 2),
        )
        for _ in range(2)
    ]
    config = PQConfig(
        num_subspaces=2, num_centroids=16, training=KMeansTraining(kmeans_iterations=5)
    )
    torch.manual_seed(0)
    reference = nn.Sequential(EmbeddingBagCollection([table]))
    state = reference.state_dict()
    compress_(reference, config, calibration=batches, forward_fn=lambda m, b: m(b))
    dmp = shard_model(
        nn.Sequential(EmbeddingBagCollection([table], device=META)), CPU, sharding_type="row_wise"
    )
    load_full_state_dict_(dmp, state)
    report = compress_(
        dmp, config, calibration=batches[rank::world_size], forward_fn=lambda m, b: m(b)
    )
    resharded = report.reshard(CPU, sharding_type="table_wise")
    with torch.no_grad():
        got = resharded(batches[0]).values()
        expected = reference(batches[0]).values()
    return float((got - expected).abs().max())


def _run(rank: int, world_size: int) -> dict[str, Any]:
    full_state = _dlrm(CPU).state_dict()
    everyone = [tiny_batch(16, seed=s) for s in CALIBRATION_SEEDS]
    mine = everyone[rank::world_size]
    out: dict[str, Any] = {}
    for name, (config, original, target, module_type) in CASES.items():
        reference = _dlrm(CPU)
        reference.load_state_dict(full_state)
        expected_report = compress_(reference, config, calibration=everyone)
        assert isinstance(reference.sparse_arch.embedding_bag_collection, module_type)

        dmp = shard_model(_dlrm(META), CPU, sharding_type=original)
        load_full_state_dict_(dmp, full_state)
        types = [type(m) for m in dmp.modules()]
        before = _logits(dmp)
        report = compress_(dmp, config, calibration=copy.copy(mine))
        assert isinstance(report, ShardedCompressionReport), type(report)
        assert [type(m) for m in dmp.modules()] == types, "the original DMP model changed"
        assert [(r.name, r.method, r.rank) for r in report.rows] == [
            (r.name, r.method, r.rank) for r in expected_report.rows
        ], (report, expected_report)

        resharded = report.reshard(CPU, sharding_type=target)
        plans = resharded.plan.plan["sparse_arch.embedding_bag_collection"].values()
        assert {p.sharding_type for p in plans} == {target}
        compressed = resharded.module.sparse_arch.embedding_bag_collection
        assert type(compressed).__name__ == f"Sharded{module_type.__name__}"
        if name == "afm":  # the same method again on the compressed DMP model: an error
            with pytest.raises(ValueError, match="already compressed"):
                compress_(resharded, config, calibration=copy.copy(mine))
        out[name] = {
            "error": float((_logits(resharded) - _logits(reference)).abs().max()),
            "unchanged": float((_logits(dmp) - before).abs().max()),
            "ratio": report.compression_ratio,
        }
    out["large_pq_error"] = _large_table_pq(rank, world_size)
    # MEC's defaults (K=256) would not make the 97- and 64-row tables smaller: never bigger,
    # never silent: they are kept (stored exactly), with their reason in the report, and the
    # 300-row table is quantized (this raised "cannot keep single tables" before)
    dmp = shard_model(_dlrm(META), CPU, sharding_type="table_wise")
    report = compress_(dmp, MECConfig(), calibration=copy.copy(mine))
    out["kept_message"] = " ".join(str(r.note) for r in report.rows)
    out["kept_methods"] = [r.method for r in report.rows]
    # M=16 of 16 dims shrinks no table: the collection stays as it is, with a warning
    with pytest.warns(UserWarning, match="keeps collection"):
        nothing = compress_(dmp, MECConfig(num_subspaces=16), calibration=copy.copy(mine))
    out["all_kept"] = [r.method for r in nothing.rows]
    return out


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict[str, Any]]]:
    return {w: run_multiprocess(_run, world_size=w) for w in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_compress_dmp_refuses_to_grow_tables(
    results: dict[int, list[dict[str, Any]]], world_size: int
) -> None:
    for rank_result in results[world_size]:
        assert "would not be smaller" in rank_result["kept_message"], rank_result["kept_message"]
        assert "stored exactly as identity codes" in rank_result["kept_message"], rank_result
        assert rank_result["kept_methods"] == ["kept", "kept", "MEC"], rank_result
        assert rank_result["all_kept"] == ["kept"] * 3, rank_result


@pytest.mark.parametrize("world_size", [1, 2])
def test_pq_of_a_table_larger_than_the_kmeans_sample_equals_the_unsharded(
    results: dict[int, list[dict[str, Any]]], world_size: int
) -> None:
    for rank_result in results[world_size]:
        assert rank_result["large_pq_error"] <= 1e-5, rank_result["large_pq_error"]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("method", list(CASES))
def test_compress_dmp_then_reshard_equals_unsharded_compress_(
    results: dict[int, list[dict[str, Any]]], world_size: int, method: str
) -> None:
    for rank_result in results[world_size]:
        got = rank_result[method]
        assert got["error"] <= 1e-5, got
        assert got["unchanged"] == 0.0, got
        assert got["ratio"] > 1.5, got
