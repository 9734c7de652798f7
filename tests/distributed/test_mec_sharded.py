"""MEC / PQ compression of a DMP-sharded model (``compress_`` then ``report.reshard``): 2 processes
give the 1-process result."""

from typing import Any

import pytest
import torch

from torchrec_compress import compress_
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
from torchrec_compress.methods.pq.config import MECConfig, MECTraining
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

# (original sharding, method, sharding of the compressed model)
VARIANTS = [("table_wise", "pq", "row_wise"), ("row_wise", "mec", "table_wise")]
EVAL = [tiny_batch(8, seed=900 + i) for i in range(2)]
CALIBRATION_SEEDS = (200, 201)


def _compress(rank: int, world_size: int) -> dict[str, Any]:
    full_state = tiny_dlrm(torch.device("cpu"), seed=7).state_dict()
    # The union of all processes' calibration batches is the same whatever the world size.
    mine = CALIBRATION_SEEDS[rank::world_size]
    out: dict[str, Any] = {}
    for original, mode, target in VARIANTS:
        model = shard_model(tiny_dlrm(torch.device("meta")), torch.device("cpu"), original)
        load_full_state_dict_(model, full_state)
        config = MECConfig(
            num_subspaces=4, num_centroids=16, mode=mode, training=MECTraining(steps=20)
        )
        report = compress_(
            model,
            config,
            [tiny_batch(16, seed=s) for s in mine],
            forward_fn=lambda m, b: m(b),
        )
        assert isinstance(
            report.compressed_model.model.sparse_arch.embedding_bag_collection,
            PQEmbeddingBagCollection,
        )
        sharded = report.reshard(torch.device("cpu"), target)
        sharded.eval()
        with torch.no_grad():
            logits = torch.cat([sharded(b)[1][1].flatten() for b in EVAL])
        out[f"{original}-{mode}"] = {
            "logits": logits,
            "ratio": report.compression_ratio,
            "perplexity": [r.perplexity for r in report.rows],
        }
    out["afm+pq"] = _lowrank_then_pq(rank, world_size, full_state)
    return out


def _lowrank_then_pq(
    rank: int, world_size: int, full_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """AFM (rank 8) on 2 processes, then PQ of its factor tables with a codeword per distinct
    row (lossless): the result must equal the low-rank model, however the columns were
    reordered.  Every table holds 8 distinct rows, so 8 codewords are lossless and still
    smaller than the factor tables (a codeword per row would not be: never bigger)."""
    mine = [tiny_batch(16, seed=s) for s in CALIBRATION_SEEDS[rank::world_size]]
    model = shard_model(tiny_dlrm(torch.device("meta")), torch.device("cpu"), "row_wise")
    state = {
        key: value[torch.arange(value.shape[0]) % 8] if ".embedding_bags." in key else value
        for key, value in full_state.items()
    }
    load_full_state_dict_(model, state)
    lowrank = compress_(model, AFMConfig(rank=8), mine, forward_fn=lambda m, b: m(b)).reshard(
        torch.device("cpu"), "row_wise"
    )
    config = MECConfig(num_subspaces=2, num_centroids=8, mode="pq")
    report = compress_(lowrank, config, mine, forward_fn=lambda m, b: m(b))
    ebc = report.compressed_model.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, LowRankEmbeddingBagCollection)
    assert isinstance(ebc.factor_ebc, PQEmbeddingBagCollection)
    assert [r.shape[1] for r in report.rows] == [8, 8, 8]
    sharded = report.reshard(torch.device("cpu"), "table_wise")
    lowrank.eval()
    sharded.eval()
    with torch.no_grad():
        return {
            "lowrank": torch.cat([lowrank(b)[1][1].flatten() for b in EVAL]),
            "logits": torch.cat([sharded(b)[1][1].flatten() for b in EVAL]),
        }


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    two = run_multiprocess(_compress, world_size=2)
    (one,) = run_multiprocess(_compress, world_size=1)
    return {"two": two, "one": one}


@pytest.mark.parametrize("variant", [f"{o}-{m}" for o, m, _ in VARIANTS])
def test_two_processes_give_the_one_process_model(results: dict[str, Any], variant: str) -> None:
    one = results["one"][variant]
    for rank_result in results["two"]:
        got = rank_result[variant]
        assert torch.allclose(got["logits"], one["logits"], atol=1e-6, rtol=0), (
            (got["logits"] - one["logits"]).abs().max()
        )
        assert got["perplexity"] == pytest.approx(one["perplexity"])
    # 16-dim rows as 4 one-byte codes (+ tiny codebooks): well over 4x smaller.
    assert one["ratio"] > 4


def test_pq_of_sharded_lowrank_factors_keeps_the_lowrank_model(results: dict[str, Any]) -> None:
    one = results["one"]["afm+pq"]
    torch.testing.assert_close(one["logits"], one["lowrank"], atol=1e-5, rtol=1e-5)
    for rank_result in results["two"]:
        got = rank_result["afm+pq"]
        torch.testing.assert_close(got["lowrank"], one["lowrank"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["logits"], one["logits"], atol=1e-5, rtol=1e-5)


def test_column_sharded_original_is_refused() -> None:
    with pytest.raises(RuntimeError, match="sharded by columns"):
        run_multiprocess(_column_wise, world_size=2, timeout_s=120)


def _column_wise(rank: int, world_size: int) -> None:
    model = shard_model(tiny_dlrm(torch.device("meta")), torch.device("cpu"), "column_wise")
    compress_(
        model,
        MECConfig(num_subspaces=4, num_centroids=16, mode="pq"),
        [tiny_batch(16, seed=rank)],
        forward_fn=lambda m, b: m(b),
    )
