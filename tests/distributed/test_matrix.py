"""The differential test matrix (``torchrec_compress.testing.matrix``): a slice in the suite.

Every defect issue 15 lists for sharded models is a named case here (each failed before its fix:
a wrong result, a crash, or a hang), next to a seeded random slice of the matrix.  Each case
compares the sharded compressed model with the unsharded one: forward, 3 training steps through
a plain loop and ``TrainPipelineSparseDist`` with TorchRec's in-backward recipe, and a
``save_compressed`` / ``load_compressed`` round trip.  One
spawn per world size runs them all; ``benchmarks/matrix.py`` runs the large slice.
"""

import pytest

from torchrec_compress.testing.matrix import judge, run_matrix
from torchrec_compress.testing.matrix_cases import (
    FORWARD_TOL,
    Case,
    Outcome,
    TableSpec,
    generate_cases,
)
from torchrec_compress.testing.multiprocess import run_multiprocess
from torchrec_compress.testing.torchrec_harness import HarnessCase, run_harness_cases


def _table(
    name: str,
    rows: int,
    dim: int,
    pooling: str = "SUM",
    features: tuple[str, ...] = (),
    kind: str = "plain",
) -> TableSpec:
    return TableSpec(name, rows, dim, pooling, features or (f"f{name[1:]}",), kind)


MEAN_MIX = (_table("t0", 300, 8, "MEAN"), _table("t1", 200, 8), _table("t2", 150, 8, "MEAN"))
TWO = (_table("t0", 300, 16), _table("t1", 200, 16))
POSITION = (_table("t0", 300, 16), _table("t1", 200, 16, kind="position"))

REGRESSIONS: dict[str, Case] = {
    # a MEAN table sharded row-wise made TorchRec divide every other table's pooled output by
    # its bag lengths (off by ~0.3, no error), uncompressed and compressed
    "mean_row_wise_beside_table_wise": Case(
        11, "dlrm", MEAN_MIX, "none", "mixed", 1, mixed=("row_wise", "table_wise", "table_wise")
    ),
    "mean_row_wise_beside_table_and_column_wise_afm": Case(
        12,
        "dlrm",
        MEAN_MIX,
        "afm",
        "mixed",
        2,
        route="shard_then_compress",
        mixed=("row_wise", "table_wise", "column_wise"),
    ),
    # the planner's own plan for TestSparseNN with feature processors: the MEAN table row-wise
    "planner_sparsenn_position_weighted_svd": Case(
        13,
        "sparsenn",
        (
            _table("t0", 4000, 16, "MEAN"),
            _table("t1", 300, 8),
            _table("t2", 200, 16, kind="position"),
        ),
        "svd",
        "planner",
        2,
        recipe="adagrad",
    ),
    # a feature read by two tables: the sharded PQ module named its outputs by feature alone
    # (KeyError 'feature_0@table_0' / a wrong split)
    "pq_shared_feature": Case(
        14,
        "sparsenn",
        (
            _table("t0", 300, 16, features=("f0",)),
            _table("t1", 300, 8, features=("f0",)),
            _table("t2", 200, 16),
        ),
        "pq",
        "table_wise",
        2,
    ),
    # TypeError: Adagrad.__init__() got an unexpected keyword argument 'optimizer'
    "afm_adagrad_recipe": Case(
        15,
        "dlrm",
        (_table("t0", 300, 16), _table("t1", 200, 16, "MEAN")),
        "afm",
        "table_wise",
        1,
        recipe="adagrad",
    ),
    # the projections' and means' SGD ran at torch's default learning rate 0.001 (TorchRec's
    # sharder renames "lr" in the shared kwargs): training silently differed
    "svd_sgd_learning_rate": Case(
        16, "dcn", (_table("t0", 300, 8), _table("t1", 200, 8)), "svd", "row_wise", 1
    ),
    # RowWiseAdagrad on the 3-D codebooks: "The size of tensor a (16) must match ... (8)"
    "mec_row_wise_adagrad_dims_16_and_8": Case(
        17,
        "sparsenn",
        (_table("t0", 300, 16), _table("t1", 200, 8)),
        "mec",
        "table_wise",
        1,
        recipe="rowwise_adagrad",
    ),
    "afm_mec_row_wise_adagrad": Case(
        18, "dlrm", TWO, "afm+mec", "table_wise", 1, recipe="rowwise_adagrad"
    ),
    # "Cannot access accelerator device": in-backward optimizers on dense replicas under DDP
    "afm_mec_adagrad_two_processes": Case(
        19, "dlrm", TWO, "afm+mec", "table_wise", 2, recipe="adagrad"
    ),
    "afm_int8_row_wise_adagrad_two_processes": Case(
        20, "dlrm", TWO, "afm+int8", "planner", 2, recipe="rowwise_adagrad"
    ),
    # TrainPipelineSparseDist on a feature-processed collection compressed with AFM / SVD
    # (the position weights trained by the dense optimizer, and in backward)
    "pipeline_position_weighted_afm": Case(
        21, "sparsenn", POSITION, "afm", "table_wise", 1, recipe="tables_sgd"
    ),
    "pipeline_position_weighted_svd_row_wise": Case(22, "sparsenn", POSITION, "svd", "row_wise", 2),
    # 'CompositeLowRankEmbeddingBagCollection' object has no attribute 'embedding_bags';
    # compress_ of a DMP model holding an FPEBC: "cannot derive the unsharded module"
    "afm_mec_position_weighted_under_dmp": Case(
        23, "sparsenn", POSITION, "afm+mec", "planner", 2, route="shard_then_compress"
    ),
    # rank 2 is stored two factor rows to a row: compressing row shards that start at an odd
    # row (50 rows on 2 processes: 25 + 25) was refused ("not multiples of 2")
    "afm_rank_2_planner_two_processes": Case(
        24,
        "dlrm",
        (_table("t0", 4001, 16), _table("t1", 50, 16)),
        "afm_k2",
        "row_wise",
        2,
        route="shard_then_compress",
    ),
    # save_compressed / compression_layout of a DMP model holding an FPEBC, uncompressed
    # included: "cannot derive the unsharded module of ShardedFeatureProcessedEmbeddingBag..."
    "save_compressed_position_weighted_uncompressed": Case(
        26, "sparsenn", POSITION, "none", "row_wise", 2, recipe="tables_sgd"
    ),
    # sharders(model) held TorchRec's inference sharder, which asserts CUDA
    "int8_planner_two_processes": Case(25, "dlrm", TWO, "int8", "planner", 2),
}

RANDOM = generate_cases(seed=2026, count=12)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    cases = [*REGRESSIONS.values(), *RANDOM]
    return {o.case: o for o in run_matrix(cases, run_multiprocess, chunk=len(cases))}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_listed_defect_is_fixed(outcomes: dict[str, Outcome], name: str) -> None:
    outcome = outcomes[REGRESSIONS[name].name]
    assert outcome.status == "pass", (outcome.status, outcome.errors, outcome.detail)


@pytest.mark.parametrize("case", RANDOM, ids=[c.name for c in RANDOM])
def test_random_case_is_right_or_refused(outcomes: dict[str, Outcome], case: Case) -> None:
    outcome = outcomes[case.name]
    assert outcome.status in ("pass", "refuse"), (outcome.status, outcome.errors, outcome.detail)


# TorchRec's own harness (sharding_single_rank_test): a feature read by a MEAN and a SUM table,
# row-wise (wrong predictions before), and PQ with such a feature ("KeyError: 'feature_0@table_0'")
HARNESS = [
    HarnessCase("none", "row_wise", "MIXED", True),
    HarnessCase("afm", "row_wise", "MIXED", True),
    HarnessCase("pq", "table_wise", "SUM", True),
    HarnessCase("mec", "row_wise", "MIXED", True),
]


def test_torchrec_harness_on_compressed_models() -> None:
    per_rank = run_multiprocess(
        run_harness_cases, world_size=2, cases=[tuple(vars(c).values()) for c in HARNESS]
    )
    for outcomes in per_rank:
        assert [(name, status) for name, status, _ in outcomes] == [
            (c.name, "pass") for c in HARNESS
        ], outcomes


def test_a_difference_above_tolerance_fails_the_case() -> None:
    outcome = judge(Outcome("c", "pass", errors={"forward": 2 * FORWARD_TOL, "train": 0.0}))
    assert outcome.status == "fail" and "forward" in outcome.detail
    assert judge(Outcome("c", "pass", errors={"forward": float("nan")})).status == "fail"
    assert judge(Outcome("c", "pass", errors={"forward": 0.0, "train": 0.0})).status == "pass"
