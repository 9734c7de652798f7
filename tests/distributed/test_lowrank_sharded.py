"""Low-rank models under DMP, and distributed compression, with 2 gloo processes.

One spawn runs everything (fixtures below); each rank feeds its own batches.

* A model holding a ``LowRankEmbeddingBagCollection`` shards table-, column- and row-wise and
  its forward equals the unsharded one.
* the sharded AFM/SVD route (:func:`sharded_lowrank_state`, what ``compress_`` runs on a DMP model,
  here with small message chunks) of a table-, column- or row-wise sharded model: summed statistics equal
  the single-process ones, factors equal those of ``compress_``, and the compressed checkpoint,
  loaded into a differently sharded compressed model, reproduces ``compress_``'s forward.
"""

import copy
import dataclasses
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRMTrain

from torchrec_compress.api import compress_
from torchrec_compress.calibration import calibrate
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.distributed.tables import SparseLookupCounter, save_compressed_state
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankConfig, SVDConfig
from torchrec_compress.methods.lowrank.factors import table_moments
from torchrec_compress.methods.lowrank.sharded_driver import (
    lowrank_skeleton_,
    sharded_lowrank_state,
    sharded_statistics,
)
from torchrec_compress.report import CompressionReport
from torchrec_compress.statistics import count_lookups
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import DENSE_IN, tiny_batch, tiny_tables

DIM = 16
CONFIG = AFMConfig(rank=8, linear=True, linear_rank=8)
SVD_CONFIG = SVDConfig(rank=8)
SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")
# the compressed model is re-sharded differently from the original
RESHARD = {"table_wise": "row_wise", "column_wise": "table_wise", "row_wise": "column_wise"}
EBC = "model.sparse_arch.embedding_bag_collection"
HIDDEN = "model.dense_arch.model._mlp.1._linear"
CPU, META = torch.device("cpu"), torch.device("meta")
CHUNK_ROWS = 24


def _model(device: torch.device) -> DLRMTrain:
    """Tiny DLRM with one hidden dense layer (32 -> 32) for the Linear path."""
    torch.manual_seed(7)
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tiny_tables(DIM), device=device),
            dense_in_features=DENSE_IN,
            dense_arch_layer_sizes=[32, 32, DIM],
            over_arch_layer_sizes=[32, 1],
            dense_device=device,
        )
    )


def _forward(model: nn.Module, batch: Batch) -> object:
    return model(batch)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch)[1][1]


def _batches(rank: int) -> list[Batch]:
    return [tiny_batch(16, seed=200 + 10 * rank + i) for i in range(2)]


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


def _rel_up_to_sign(got: torch.Tensor, expected: torch.Tensor, dim: int) -> float:
    """Relative error after flipping ``got``'s vectors along ``dim`` to match ``expected``."""
    signs = torch.sign((got.double() * expected.double()).sum(dim=dim, keepdim=True))
    return _rel(got.double() * torch.where(signs == 0, 1.0, signs), expected)


def _loaded_state(checkpoint: str, table_ranks: dict, linear_ranks: dict) -> dict:
    """The compressed checkpoint loaded whole into one unsharded CPU module."""
    plain = lowrank_skeleton_(_model(CPU), table_ranks, linear_ranks, device=CPU)
    state = {"model": plain.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    return state["model"]


def _compress_sharded(
    dmp: DistributedModelParallel,
    config: LowRankConfig,
    batches: list[Batch] | None,
    checkpoint: str,
) -> tuple[nn.Module, CompressionReport]:
    """The sharded route with small chunks (several messages per row exchange), saved."""
    compressed, state, report = sharded_lowrank_state(
        dmp, _model(META), config, batches, _forward, chunk_rows=CHUNK_ROWS
    )
    save_compressed_state(state, checkpoint)
    return compressed, report


def _svd_factor_error(dmp: nn.Module, original: nn.Module, path: str) -> float:
    reference = copy.deepcopy(original)
    report = compress_(reference, SVD_CONFIG)
    checkpoint = os.path.join(path, "svd")
    _, sharded_report = _compress_sharded(dmp, SVD_CONFIG, None, checkpoint)
    assert [r.rank for r in sharded_report.rows] == [r.rank for r in report.rows]
    ranks = {r.name: r.rank for r in report.rows if r.rank}
    state, expected = _loaded_state(checkpoint, ranks, {}), reference.state_dict()
    return max(
        _rel_up_to_sign(state[k], expected[k], dim=0 if "factor_ebc" in k else -1)
        for k in state
        if ".embedding_bag_collection." in k
    )


def _run(rank: int, world_size: int, path: str) -> dict[str, float]:
    original = _model(CPU)
    original_state = original.state_dict()
    everyone = [b for r in range(world_size) for b in _batches(r)]
    reference = copy.deepcopy(original)
    report = compress_(reference, CONFIG, everyone, forward_fn=_forward)
    reference_state = reference.state_dict()
    table_ranks = {r.name: r.rank for r in report.rows if r.kind == "table" and r.rank}
    linear_ranks = {r.name: r.rank for r in report.rows if r.kind == "linear" and r.rank}
    assert linear_ranks == {HIDDEN: 8}, report
    test_batch = tiny_batch(16, seed=500 + rank)
    expected = _logits(reference, test_batch)

    # single-process statistics over everyone's batches
    counts = count_lookups(tiny_tables(DIM), everyone)
    weights = original.model.sparse_arch.embedding_bag_collection.embedding_bags
    ref_moments = {
        t.name: table_moments(weights[t.name].weight, counts[t.name], t.name)
        for t in tiny_tables(DIM)
    }
    _, ref_linear = calibrate(
        original, everyone, _forward, linears={HIDDEN: original.get_submodule(HIDDEN)}
    )
    ref_moments[HIDDEN] = ref_linear[HIDDEN]

    out: dict[str, float] = {}
    for sharding_type in SHARDING_TYPES:
        skeleton = lowrank_skeleton_(_model(META), table_ranks, linear_ranks)
        sharded = shard_model(skeleton, CPU, sharding_type=sharding_type)
        # planned as one module (its own sharder), not as a walked-into factor EBC
        kinds = {p.sharding_type for p in sharded.plan.plan[EBC].values()}
        assert kinds == {sharding_type}, f"planner chose {kinds} instead of {sharding_type}"
        load_full_state_dict_(sharded, reference_state)
        out[f"dmp/{sharding_type}"] = _rel(_logits(sharded, test_batch), expected)

    for sharding_type in SHARDING_TYPES:
        dmp = shard_model(_model(META), CPU, sharding_type=sharding_type)
        placements = dmp.plan.plan[EBC].values()
        assert {p.sharding_type for p in placements} == {sharding_type}
        assert len({r for p in placements for r in p.ranks}) == world_size
        if sharding_type == "column_wise":  # column blocks of one table on both processes
            assert any(len(set(p.ranks)) == world_size for p in placements)
        load_full_state_dict_(dmp, original_state)
        # small chunks, so that row exchanges and factor reductions take several messages
        stats = sharded_statistics(
            dmp, _model(META), CONFIG, _batches(rank), _forward, chunk_rows=CHUNK_ROWS
        )
        got = {**stats.table_moments, **stats.linear_moments}
        assert set(got) == set(ref_moments)
        out[f"stats/{sharding_type}"] = max(
            _rel(getattr(got[n], f), getattr(ref_moments[n], f))
            for n in ref_moments
            for f in ("count", "sum", "sum_outer")
        )

        checkpoint = os.path.join(path, sharding_type)
        compressed, sharded_report = _compress_sharded(dmp, CONFIG, _batches(rank), checkpoint)
        assert [(r.name, r.rank) for r in sharded_report.rows] == [
            (r.name, r.rank) for r in report.rows
        ]
        # factors: the checkpoint loaded whole into one unsharded module
        errors = [0.0]
        for key, value in _loaded_state(checkpoint, table_ranks, linear_ranks).items():
            if key.endswith((".weight", ".bias")) and "factor_ebc" not in key:
                errors.append(_rel(value, reference_state[key]))  # dense: same sign rule
            elif "factor_ebc" in key:
                errors.append(_rel_up_to_sign(value, reference_state[key], dim=0))
            else:
                errors.append(_rel_up_to_sign(value, reference_state[key], dim=-1))
        out[f"factors/{sharding_type}"] = max(errors)

        if sharding_type == "column_wise":  # SVD: uniform row weights, no calibration
            out["svd/column_wise"] = _svd_factor_error(dmp, original, path)

        resharded = shard_model(compressed, CPU, sharding_type=RESHARD[sharding_type])
        before = _logits(resharded, test_batch)
        state = {"model": resharded.state_dict()}
        dcp.load(state, checkpoint_id=checkpoint)
        resharded.load_state_dict(state["model"])
        after = _logits(resharded, test_batch)
        assert not torch.equal(before, after), "loading the checkpoint changed nothing"
        out[f"forward/{sharding_type}"] = _rel(after, expected)
    return out


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    path = str(tmp_path_factory.mktemp("compressed"))
    per_rank = run_multiprocess(_run, world_size=2, path=path)
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_lowrank_model_sharded_forward_matches_unsharded(
    errors: dict[str, float], sharding_type: str
) -> None:
    assert errors[f"dmp/{sharding_type}"] <= 1e-5, errors


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_statistics_equal_single_process(
    errors: dict[str, float], sharding_type: str
) -> None:
    assert errors[f"stats/{sharding_type}"] <= 1e-6, errors


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_factors_equal_compress_(errors: dict[str, float], sharding_type: str) -> None:
    assert errors[f"factors/{sharding_type}"] <= 1e-5, errors


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_resharded_compressed_forward_equals_compress_(
    errors: dict[str, float], sharding_type: str
) -> None:
    assert errors[f"forward/{sharding_type}"] <= 1e-5, errors


def test_sparse_lookup_counter_equals_dense_counts() -> None:
    batches = _batches(0) + _batches(1)
    counter = SparseLookupCounter(tiny_tables(DIM))
    for batch in batches:
        counter.update(batch.sparse_features)
    dense = count_lookups(tiny_tables(DIM), batches)
    for name, (ids, counts) in counter.counts().items():
        assert torch.equal(dense[name].nonzero().squeeze(1), ids)
        assert torch.equal(dense[name][ids], counts)


def test_sparse_lookup_counter_names_table_of_bad_id() -> None:
    batch = tiny_batch(4, seed=0)
    counter = SparseLookupCounter([dataclasses.replace(tiny_tables(DIM)[0], num_embeddings=2)])
    with pytest.raises(ValueError, match="t_f0"):
        counter.update(batch.sparse_features)


def test_sharded_svd_factors_equal_compress_(errors: dict[str, float]) -> None:
    assert errors["svd/column_wise"] <= 1e-5, errors
