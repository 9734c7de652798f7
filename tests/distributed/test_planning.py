"""Planner storage of meta-device models, original vs low-rank (no processes, no memory)."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import Topology
from torchrec.models.dlrm import DLRM

from torchrec_compress import LowRankEmbeddingBagCollection, LowRankLinear
from torchrec_compress.distributed.planning import plan_storage
from torchrec_compress.methods.lowrank.sharded_driver import lowrank_skeleton_

META = torch.device("meta")
DIM, RANK = 64, 8
TOPOLOGY = Topology(world_size=8, local_world_size=4, compute_device="cuda", hbm_cap=16 * 2**30)


def _meta_dlrm() -> DLRM:
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=DIM, num_embeddings=n, feature_names=[f"f{i}"]
        )
        for i, n in enumerate((50_000_000, 1_000, 200_000))
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=META),
        dense_in_features=4,
        dense_arch_layer_sizes=[32, DIM],
        over_arch_layer_sizes=[64, 32, 1],
        dense_device=META,
    )


@pytest.fixture(scope="module")
def storages() -> tuple:
    original = _meta_dlrm()
    compressed = lowrank_skeleton_(
        _meta_dlrm(), {"t0": RANK, "t1": RANK, "t2": RANK}, {"over_arch.model.0._mlp.1._linear": 8}
    )
    return plan_storage(original, TOPOLOGY), plan_storage(compressed, TOPOLOGY)


def test_skeleton_builds_on_meta_without_memory() -> None:
    model = lowrank_skeleton_(_meta_dlrm(), {"t0": RANK}, {"over_arch.model.0._mlp.1._linear": 8})
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, LowRankEmbeddingBagCollection)
    assert ebc.ranks() == {"t0": RANK}
    assert ebc.factor_ebc.embedding_bags["t0"].weight.shape == (50_000_000, RANK)
    assert ebc.factor_ebc.embedding_bags["t1"].weight.shape == (1_000, DIM)  # kept full width
    assert isinstance(model.over_arch.model[0]._mlp[1]._linear, LowRankLinear)
    assert all(p.is_meta for p in model.parameters())


def test_skeleton_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="nope"):
        lowrank_skeleton_(_meta_dlrm(), {"nope": 4})
    with pytest.raises(ValueError, match="not nn.Linear"):
        lowrank_skeleton_(_meta_dlrm(), {}, {"over_arch.model.0._mlp.1": 4})


def test_planner_sizes_factor_tables_at_rows_times_k(storages: tuple) -> None:
    original, compressed = storages
    by_name = {t.table: t for t in compressed.tables}
    assert set(by_name) == {"t0", "t1", "t2"}
    assert by_name["t0"].shape == (50_000_000, RANK)
    # one unit: the low-rank collection itself is planned (its sharder shows the factor tables)
    assert by_name["t0"].module == "sparse_arch.embedding_bag_collection"
    # the planner's estimate covers at least the fp32 factor table itself
    assert by_name["t0"].hbm >= 50_000_000 * RANK * 4
    assert original.hbm == sum(t.hbm for t in original.tables)


def test_planned_storage_shrinks_by_about_d_over_k(storages: tuple) -> None:
    original, compressed = storages
    ratio = original.hbm / compressed.hbm
    assert 7.5 <= ratio <= DIM / RANK + 1e-6, ratio
    assert "total: hbm" in str(compressed)


def test_compressed_fits_in_device_memory_where_original_spills_to_host() -> None:
    small = Topology(world_size=2, local_world_size=2, compute_device="cuda", hbm_cap=4 * 2**30)
    compressed = plan_storage(
        lowrank_skeleton_(_meta_dlrm(), {"t0": RANK, "t1": RANK, "t2": RANK}), small
    )
    assert compressed.ddr == 0
    assert {t.compute_kernel for t in compressed.tables} == {"fused"}
    # 50M x 64 fp32 (11.9 GiB) cannot sit in 2 x 4 GiB: the planner caches it in host memory
    original = plan_storage(_meta_dlrm(), small)
    assert original.ddr > 10 * 2**30
