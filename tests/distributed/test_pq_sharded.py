"""PQ (MEC) models under DMP and the planner, with 2 gloo processes (one spawn for the module).

* A DLRM whose EBC is a ``PQEmbeddingBagCollection`` shards table- and row-wise through DMP and
  the planner; its forward equals the unsharded one and its codebook gradients equal the
  unsharded gradients averaged over the processes (DDP semantics).
* ``state_dict``: codes are ``ShardedTensor``s, codebooks plain tensors; a full state dict loads
  (``load_state_dict`` and ``load_full_state_dict_``); a DCP checkpoint of the table-wise model
  loads into the row-wise one.
* A weighted, multi-feature PQ collection sharded directly.
* ``encode_sharded_codes_`` of a row-wise float EBC equals single-process encoding.
* Planning (single process, meta device): codes are sized at ``rows * M`` bytes.
"""

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingType
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import PoolingType

from torchrec_compress.distributed.planning import default_sharders, plan_storage
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.pq import ProductQuantizer
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.sharded import (
    PQEmbeddingBagCollectionSharder,
    ShardedPQEmbeddingBagCollection,
)
from torchrec_compress.methods.pq.sharded_encode import encode_sharded_codes_
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import DENSE_IN, tiny_batch, tiny_tables

DIM, M, K = 16, 4, 16
SHARDING_TYPES = ("table_wise", "row_wise")
ALL_SHARDING_TYPES = (*SHARDING_TYPES, "table_row_wise")
PQ_PATH = "model.sparse_arch.embedding_bag_collection"
CPU, META = torch.device("cpu"), torch.device("meta")


def _pq(
    tables: list[EmbeddingBagConfig], device: torch.device, **kwargs: Any
) -> PQEmbeddingBagCollection:
    gen = torch.Generator().manual_seed(3)
    codes, books = {}, {}
    for t in tables:
        if device.type == "meta":
            codes[t.name] = torch.empty(t.num_embeddings, M, dtype=torch.uint8, device=META)
            books[t.name] = torch.empty(M, K, t.embedding_dim // M, device=META)
        else:
            codes[t.name] = torch.randint(K, (t.num_embeddings, M), generator=gen).to(torch.uint8)
            books[t.name] = torch.randn(M, K, t.embedding_dim // M, generator=gen)
    return PQEmbeddingBagCollection(tables, codes, books, **kwargs)


def _pq_dlrm(device: torch.device) -> DLRMTrain:
    pq = _pq(tiny_tables(DIM), device)
    torch.manual_seed(7)  # same dense weights whatever the device of the codes
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=pq,  # type: ignore[arg-type]
            dense_in_features=DENSE_IN,
            dense_arch_layer_sizes=[32, DIM],
            over_arch_layer_sizes=[32, 1],
        )
    )


def _sharders() -> list[ModuleSharder[nn.Module]]:
    return [PQEmbeddingBagCollectionSharder(), *default_sharders()]  # type: ignore[list-item]


def _dmp(
    model: nn.Module, sharding_type: str, tables: list[EmbeddingBagConfig]
) -> DistributedModelParallel:
    topology = Topology(world_size=dist.get_world_size(), compute_device="cpu")
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding_type]) for t in tables}
    pg = dist.group.WORLD
    assert pg is not None
    plan = EmbeddingShardingPlanner(topology, constraints=constraints).collective_plan(
        model, _sharders(), pg
    )
    return DistributedModelParallel(model, device=CPU, plan=plan, sharders=_sharders())


def _codebook_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.split("codebooks.")[1]: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if "codebooks." in name and p.grad is not None
    }


def _dlrm_checks(rank: int, world_size: int, checkpoint: str) -> dict[str, Any]:
    reference = _pq_dlrm(CPU)
    full_state = reference.state_dict()
    batch = tiny_batch(16, seed=100 + rank)  # each rank feeds different rows
    loss, (_, expected, _) = reference(batch)
    loss.backward()
    reference_grads = _codebook_grads(reference)
    for grad in reference_grads.values():
        dist.all_reduce(grad)
        grad /= world_size  # DDP averages gradients over processes
    out: dict[str, Any] = {"grad_norm": min(float(g.norm()) for g in reference_grads.values())}
    for sharding_type in SHARDING_TYPES:
        dmp = _dmp(_pq_dlrm(META), sharding_type, tiny_tables(DIM))
        sharded = dmp.module.model.sparse_arch.embedding_bag_collection
        assert isinstance(sharded, ShardedPQEmbeddingBagCollection)
        kinds = {p.sharding_type for p in dmp.plan.plan[PQ_PATH].values()}
        kernels = {p.compute_kernel for p in dmp.plan.plan[PQ_PATH].values()}
        state = dmp.state_dict()
        out[f"{sharding_type}/plan"] = (kinds, kernels)
        out[f"{sharding_type}/state_types"] = {
            k.split(PQ_PATH + ".")[1]: (type(v).__name__, v.dtype)
            for k, v in state.items()
            if k.startswith(PQ_PATH)
        }
        # the fresh (meta-built) codes are zeros: a forward tells whether the load worked
        # the project's helper (ShardedTensor views) and load_state_dict (full-tensor hook)
        if sharding_type == "table_wise":
            load_full_state_dict_(dmp, full_state)
        else:
            dmp.load_state_dict(full_state)
        loss, (_, got, _) = dmp(batch)
        loss.backward()
        out[f"{sharding_type}/forward"] = float((got - expected).abs().max())
        grads = _codebook_grads(dmp)
        out[f"{sharding_type}/grad"] = max(
            float((grads[name] - reference_grads[name]).abs().max()) for name in reference_grads
        )
        out[f"{sharding_type}/grad_keys"] = sorted(grads) == sorted(reference_grads)
        if sharding_type == "table_wise":
            dcp.save(dmp.state_dict(), checkpoint_id=checkpoint)
    # a checkpoint of the table-wise model, resharded into a fresh row-wise one
    dmp = _dmp(_pq_dlrm(META), "row_wise", tiny_tables(DIM))
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    dmp.load_state_dict(state)
    with torch.no_grad():
        _, (_, got, _) = dmp(batch)
    out["dcp_reshard/forward"] = float((got - expected).abs().max())
    sharded = dmp.module.model.sparse_arch.embedding_bag_collection
    bad = {"codes.t_f0": torch.full((97, M), K, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="t_f0.*\\[0, 16\\)"):
        sharded.load_state_dict(bad, strict=False)
    bad_batch = tiny_batch(4, seed=1)
    bad_batch.sparse_features.values()[-1] = 300  # t_f2 has 300 rows
    with pytest.raises(IndexError, match="t_f2.*300"):
        dmp(bad_batch)
    out["errors"] = True
    return out


def _weighted_checks(rank: int, world_size: int) -> dict[str, float]:
    tables = [
        EmbeddingBagConfig(
            name="user", embedding_dim=8, num_embeddings=50, feature_names=["u", "v"]
        ),
        EmbeddingBagConfig(name="item", embedding_dim=12, num_embeddings=31, feature_names=["i"]),
    ]
    reference = _pq(tables, CPU, is_weighted=True)
    gen = torch.Generator().manual_seed(rank)
    lengths = torch.tensor([3, 0, 1, 5, 0, 2, 2, 0, 4, 4, 0, 1])  # empty bags in every feature
    maxima = torch.tensor([50] * 8 + [31] * 4).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=gen) * maxima).long()
    weights = torch.rand(values.numel(), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(["u", "v", "i"], values, lengths, weights)
    expected = reference(kjt).values()
    out = {}
    for sharding_type in ALL_SHARDING_TYPES:  # codes copied from the CPU module by the sharder
        dmp = _dmp(_pq(tables, CPU, is_weighted=True), sharding_type, tables)
        assert {p.sharding_type for p in dmp.plan.plan[""].values()} == {sharding_type}
        with torch.no_grad():
            got = dmp(kjt).wait()
        assert got.keys() == ["u", "v", "i"] and got.length_per_key() == [8, 8, 12]
        out[sharding_type] = float((got.values() - expected).abs().max())
    return out


def _encode_checks(rank: int, world_size: int) -> dict[str, list[tuple[int, list[list[int]]]]]:
    tables = [
        EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=301, feature_names=["f"])
    ]
    weight = torch.randn(301, DIM, generator=torch.Generator().manual_seed(5))
    quantizer = ProductQuantizer(DIM, M, K)
    quantizer.train(weight, niter=3, generator=torch.Generator().manual_seed(6))
    floats = _dmp(EmbeddingBagCollection(tables, device=META), "row_wise", tables)
    load_full_state_dict_(floats, {"embedding_bags.t.weight": weight})
    float_weight = floats.state_dict()["embedding_bags.t.weight"]
    assert isinstance(float_weight, ShardedTensor)
    out = {}
    for sharding_type in SHARDING_TYPES:  # table-wise codes move; row-wise codes stay local
        dmp = _dmp(_pq(tables, META), sharding_type, tables)
        sharded = dmp.module
        assert isinstance(sharded, ShardedPQEmbeddingBagCollection)
        encode_sharded_codes_(sharded.sharded_codes("t"), float_weight, quantizer, chunk_size=7)
        local = dmp.state_dict()["codes.t"]
        out[sharding_type] = [
            (s.metadata.shard_offsets[0], s.tensor.tolist()) for s in local.local_shards()
        ]
    return out


def _run(rank: int, world_size: int, checkpoint: str) -> dict[str, Any]:
    return {
        "dlrm": _dlrm_checks(rank, world_size, checkpoint),
        "weighted": _weighted_checks(rank, world_size),
        "encode": _encode_checks(rank, world_size),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    checkpoint = os.path.join(str(tmp_path_factory.mktemp("pq")), "checkpoint")
    return run_multiprocess(_run, world_size=2, checkpoint=checkpoint)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_dmp_forward_and_codebook_grads_match_unsharded(
    results: list[dict[str, Any]], sharding_type: str
) -> None:
    for r in results:
        dlrm = r["dlrm"]
        assert dlrm[f"{sharding_type}/plan"] == ({sharding_type}, {"quant"})
        assert dlrm[f"{sharding_type}/forward"] <= 1e-6, dlrm
        assert dlrm[f"{sharding_type}/grad_keys"] and dlrm["grad_norm"] > 0
        assert dlrm[f"{sharding_type}/grad"] <= 1e-6, dlrm


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_state_dict_codes_sharded_codebooks_plain(
    results: list[dict[str, Any]], sharding_type: str
) -> None:
    types = results[0]["dlrm"][f"{sharding_type}/state_types"]
    for table in ("t_f0", "t_f1", "t_f2"):
        assert types[f"codes.{table}"] == ("ShardedTensor", torch.uint8)
        assert types[f"codebooks.{table}"] == ("Tensor", torch.float32)


def test_dcp_checkpoint_reshards_table_wise_into_row_wise(results: list[dict[str, Any]]) -> None:
    assert max(r["dlrm"]["dcp_reshard/forward"] for r in results) <= 1e-6


def test_bad_codes_and_out_of_range_ids_raise_naming_the_table(
    results: list[dict[str, Any]],
) -> None:
    assert all(r["dlrm"]["errors"] for r in results)


@pytest.mark.parametrize("sharding_type", ALL_SHARDING_TYPES)
def test_weighted_multi_feature_matches_unsharded(
    results: list[dict[str, Any]], sharding_type: str
) -> None:
    assert max(r["weighted"][sharding_type] for r in results) <= 1e-6


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_encode_sharded_codes_equals_single_process(
    results: list[dict[str, Any]], sharding_type: str
) -> None:
    weight = torch.randn(301, DIM, generator=torch.Generator().manual_seed(5))
    quantizer = ProductQuantizer(DIM, M, K)
    quantizer.train(weight, niter=3, generator=torch.Generator().manual_seed(6))
    expected = quantizer.compute_codes(weight)
    got = torch.full_like(expected, 255)
    for r in results:
        for offset, rows in r["encode"][sharding_type]:
            got[offset : offset + len(rows)] = torch.tensor(rows, dtype=torch.uint8)
    assert torch.equal(got, expected)


def test_sharder_exposes_codes_at_their_dtype_and_shape() -> None:
    pq = _pq(tiny_tables(DIM), META)
    sharder = PQEmbeddingBagCollectionSharder()
    params = sharder.shardable_parameters(pq)
    assert {k: (tuple(v.shape), v.dtype) for k, v in params.items()} == {
        "t_f0": ((97, M), torch.uint8),
        "t_f1": ((64, M), torch.uint8),
        "t_f2": ((300, M), torch.uint8),
    }
    assert ShardingType.ROW_WISE.value in sharder.sharding_types("cpu")


def test_planner_sizes_codes_over_30x_below_fp32() -> None:
    rows, dim = 10**7, 128
    table = EmbeddingBagConfig(
        name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"]
    )
    codes = PQEmbeddingBagCollection(
        [table],
        {"t": torch.empty(rows, 16, dtype=torch.uint8, device=META)},
        {"t": torch.empty(16, 256, dim // 16, device=META)},
    )
    floats = EmbeddingBagCollection([table], device=META)
    topology = Topology(world_size=8, local_world_size=8, compute_device="cuda", hbm_cap=80 * 2**30)
    pq_storage = plan_storage(codes, topology, sharders=_sharders())
    fp32_storage = plan_storage(floats, topology, sharders=_sharders())
    assert pq_storage.tables[0].shape == (rows, 16)
    assert pq_storage.hbm >= rows * 16
    assert fp32_storage.hbm / pq_storage.hbm >= 30


# ------------------------------------------ tables of several code shapes, 1 and 2 processes


def _mixed_tables() -> tuple[list[EmbeddingBagConfig], dict[str, torch.Tensor], dict[str, Any]]:
    """Three tables in two code shapes, the shapes interleaved in module order (a, b, c):
    a and c (M=2, dsub=4, K=4 and 6) pool together, b (M=1, dsub=12, MEAN) alone."""
    mean = PoolingType.MEAN
    tables = [
        EmbeddingBagConfig(
            name="a", embedding_dim=8, num_embeddings=40, feature_names=["a1", "a2"]
        ),
        EmbeddingBagConfig(
            name="b", embedding_dim=12, num_embeddings=30, feature_names=["b1"], pooling=mean
        ),
        EmbeddingBagConfig(
            name="c", embedding_dim=8, num_embeddings=20, feature_names=["c1"], pooling=mean
        ),
    ]
    gen = torch.Generator().manual_seed(11)
    shapes = {"a": (2, 4, 4), "b": (1, 8, 12), "c": (2, 6, 4)}
    codes, books = {}, {}
    for t in tables:
        m, k, dsub = shapes[t.name]
        codes[t.name] = torch.randint(k, (t.num_embeddings, m), generator=gen).to(torch.uint8)
        books[t.name] = torch.randn(m, k, dsub, generator=gen)
    return tables, codes, books


def _mixed_checks(rank: int, world_size: int) -> dict[str, Any]:
    """Sharded == unsharded (forward and codebook gradients) with an input in another key order
    holding a foreign feature, and one pooled kernel call per code shape (not per feature)."""
    import torchrec_compress.methods.pq.sharded as pq_sharded

    tables, codes, books = _mixed_tables()
    keys, rows = ["c1", "z", "b1", "a2", "a1"], [20, 5, 30, 40, 40]
    gen = torch.Generator().manual_seed(12)  # the same batch on every process
    lengths = torch.randint(0, 4, (len(keys) * 4,), generator=gen)
    lengths[[1, 6, 13]] = 0  # empty bags, one of them in the MEAN table
    maxima = torch.tensor(rows).repeat_interleave(4).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=gen) * maxima).long()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)
    probe = torch.randn(4, 36, generator=gen)

    reference = PQEmbeddingBagCollection(tables, codes, books)
    expected = reference(kjt)
    (expected.values() * probe).sum().backward()
    expected_grads = _codebook_grads(reference)
    calls = []

    def counting(*args: Any) -> torch.Tensor:
        calls.append(1)
        return lookup(*args)

    lookup = pq_sharded.pq_feature_lookup
    pq_sharded.pq_feature_lookup = counting  # type: ignore[assignment]
    out: dict[str, Any] = {}
    try:
        for sharding_type in SHARDING_TYPES:
            dmp = _dmp(PQEmbeddingBagCollection(tables, codes, books), sharding_type, tables)
            calls.clear()
            got = dmp(kjt).wait()
            out[f"{sharding_type}/calls"] = len(calls)
            out[f"{sharding_type}/keys"] = (got.keys(), got.length_per_key())
            out[f"{sharding_type}/forward"] = float((got.values() - expected.values()).abs().max())
            (got.values() * probe).sum().backward()
            grads = _codebook_grads(dmp)
            out[f"{sharding_type}/grad"] = max(
                float((grads[t] - g).abs().max()) for t, g in expected_grads.items()
            )
            out[f"{sharding_type}/grad_keys"] = sorted(grads)
    finally:
        pq_sharded.pq_feature_lookup = lookup  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def mixed_results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_multiprocess(_mixed_checks, world_size=request.param)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_mixed_code_shapes_match_unsharded_with_one_kernel_call_per_shape(
    mixed_results: list[dict[str, Any]], sharding_type: str
) -> None:
    for r in mixed_results:
        assert r[f"{sharding_type}/keys"] == (["a1", "a2", "b1", "c1"], [8, 8, 12, 8])
        assert r[f"{sharding_type}/forward"] <= 1e-6, r
        assert r[f"{sharding_type}/grad_keys"] == ["a", "b", "c"]
        assert r[f"{sharding_type}/grad"] <= 1e-5, r
        assert r[f"{sharding_type}/calls"] == 2, r  # one per code shape, not one per feature
