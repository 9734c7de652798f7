"""``compress_(dmp, BudgetConfig(...))``: one byte budget planned and applied on a sharded model.

TorchRec's ``DLRM`` and ``TestSparseNN`` (a weighted collection, a position-weighted table) are
sharded by DMP on 2 gloo processes (table-, row-, column-wise, or as TorchRec's planner chooses), and a budget is planned on the sharded model (statistics where the rows live,
sampled rows gathered) and applied stage by stage through the sharded drivers.  Every case is
compared with the unsharded model: the plan equals the one ``compress_`` makes of the same
weights and the union of both processes' batches (where a sharded model can hold that plan),
and the resharded model's logits equal those of the unsharded model compressed by the same plan.
Before this change, ``compress_`` refused every DMP model with a ``BudgetConfig``.
"""

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torchrec.distributed.test_utils.test_model import ModelInput, TestSparseNN
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress import BudgetConfig, compress_
from torchrec_compress.budget.driver import apply_stages, budget_stages, plan_budget
from torchrec_compress.distributed.budget import ShardedBudgetReport
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.distributed.tables import gather_rows
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.matrix_models import random_kjt
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

CPU, META = torch.device("cpu"), torch.device("meta")
# four batches; process r takes two in a row, so that the halves of each process's list
# (every other batch) are, together, the halves of the whole list the unsharded planner takes
EVERYONE_SEEDS = (300, 301, 302, 303)
EVAL = [tiny_batch(8, seed=700 + i) for i in range(2)]
NO_INT4 = ("fp16", "int8", "afm", "pq", "afm+pq", "afm+int8")
SMALL = dict(num_centroids=16, subspaces=(2, 4), ranks=(4, 8))
# name -> (config, sharding of the original (None: TorchRec's planner), whether the sharded
# plan must equal the unsharded one); the tables take 29,504 bytes
CASES: dict[str, tuple[BudgetConfig, str | None, bool]] = {
    # AFM, then PQ of the factor tables: two stages, resharded between them
    "afm_then_pq": (BudgetConfig(3000, methods=NO_INT4, **SMALL), "table_wise", True),  # type: ignore[arg-type]
    "pq": (BudgetConfig(4500, methods=NO_INT4, **SMALL), "row_wise", True),  # type: ignore[arg-type]
    # AFM then int8 of one table's factors, fp16 and int8 rows of the others
    "afm_then_rowwise": (BudgetConfig(7000, methods=NO_INT4, **SMALL), None, True),  # type: ignore[arg-type]
    # unsharded, the 64-row table would stay fp32 inside the PQ collection: a sharded PQ
    # collection cannot keep a table that quantizing would shrink, so it is quantized too
    "pq_holds_no_large_kept_table": (
        BudgetConfig(7000, methods=("pq", "afm+pq"), **SMALL),  # type: ignore[arg-type]
        "table_wise",
        False,
    ),
    # K=64: quantizing the 64-row table would not shrink it: kept as identity codes, which a
    # sharded collection stores (64 bytes more than its rows; an unsharded one derives them)
    "pq_keeps_a_small_table": (
        BudgetConfig(14000, methods=("pq",), num_centroids=64, subspaces=(2, 4)),
        "table_wise",
        False,
    ),
    "everything_fits": (BudgetConfig(30000, **SMALL), None, True),  # type: ignore[arg-type]
    # split by columns: the samples are assembled from column blocks, and the model is
    # resharded by whole rows before product quantization (which refuses column splits)
    # replicated tables: process 0 holds the rows every sample is read from
    "afm_then_pq_of_data_parallel_tables": (
        BudgetConfig(3000, methods=NO_INT4, **SMALL),  # type: ignore[arg-type]
        "data_parallel",
        True,
    ),
    "pq_of_column_wise_tables": (
        BudgetConfig(4500, methods=NO_INT4, **SMALL),  # type: ignore[arg-type]
        "column_wise",
        True,
    ),
}


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b.dense_features, b.sparse_features).flatten() for b in EVAL])


def _labels(plan: list[Any]) -> list[tuple[str, str]]:
    return [(p.name, p.option.label) for p in plan]


def _case(name: str, rank: int, world_size: int) -> dict[str, Any]:
    config, sharding, same_plan = CASES[name]
    full_state = tiny_dlrm(CPU, seed=11).state_dict()
    everyone = [tiny_batch(16, seed=s) for s in EVERYONE_SEEDS]
    per = len(everyone) // world_size
    mine = everyone[rank * per : (rank + 1) * per]
    dmp = shard_model(tiny_dlrm(META, seed=11).model, CPU, sharding_type=sharding)
    load_full_state_dict_(dmp, {k.removeprefix("model."): v for k, v in full_state.items()})
    before = _logits(dmp)
    forward = lambda m, b: m(b.dense_features, b.sparse_features)  # noqa: E731
    report = compress_(dmp, config, calibration=copy.copy(mine), forward_fn=forward)
    assert isinstance(report, ShardedBudgetReport), type(report)
    resharded = report.reshard(CPU)

    reference = tiny_dlrm(CPU, seed=11).model
    reference.load_state_dict({k.removeprefix("model."): v for k, v in full_state.items()})
    unsharded_plan = plan_budget(reference, config, everyone, None, forward)
    apply_stages(reference, report.plan, budget_stages(report.plan, config), everyone, forward)
    return {
        "plan": _labels(report.plan),
        "unsharded_plan": _labels(unsharded_plan),
        "same_plan": same_plan,
        "bytes": report.bytes_after,
        "planned": sum(p.option.bytes for p in report.plan),
        "methods": [r.method for r in report.rows],
        "error": float((_logits(resharded) - _logits(reference)).abs().max()),
        "unchanged": float((_logits(dmp) - before).abs().max()),
        "text": str(report),
    }


SPARSE_NN_TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=r, feature_names=[f"f{i}"])
    for i, r in enumerate((400, 100))
]
SPARSE_NN_WEIGHTED = [
    EmbeddingBagConfig(name="w0", embedding_dim=16, num_embeddings=300, feature_names=["w0"])
]


def _sparse_nn(device: torch.device) -> nn.Module:
    """t1 position-weighted (TorchRec wraps it in a FeatureProcessedEmbeddingBagCollection)."""
    torch.manual_seed(0)
    model = TestSparseNN(
        tables=SPARSE_NN_TABLES,
        weighted_tables=SPARSE_NN_WEIGHTED,
        dense_device=device,
        sparse_device=device,
        max_feature_lengths={"t1": 4},
    )
    if device != META:
        with torch.no_grad():  # position weights start at 1: make them matter
            for name, p in model.named_parameters():
                if "position_weight" in name:
                    p.uniform_(0.5, 1.5)
    return model


def _sparse_nn_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """TestSparseNN's loss in eval mode too (where it returns its predictions alone)."""
    out = model(batch)
    predictions = out[1] if isinstance(out, tuple) else out
    return nn.functional.binary_cross_entropy_with_logits(predictions, batch.label)


def _sparse_nn_case(
    rank: int, world_size: int, ratio: int, only_weighted: bool = False
) -> dict[str, Any]:
    """TorchRec's TestSparseNN: two collections (one weighted by per-id weights, one holding a
    position-weighted table), planned as TorchRec's planner chooses; ``only_weighted``: the
    budget over the weighted collection alone (``filter_fn``)."""
    g = torch.Generator().manual_seed(5)
    everyone = [
        ModelInput(
            float_features=torch.randn(16, 10, generator=g),
            idlist_features=random_kjt([("f0", 400, 4), ("f1", 100, 4)], 16, g, False),
            idscore_features=random_kjt([("w0", 300, 3)], 16, g, True),
            label=torch.randint(0, 2, (16,), generator=g).float(),
        )
        for _ in range(4)
    ]
    per = len(everyone) // world_size
    mine = everyone[rank * per : (rank + 1) * per]
    # at 6x the errors are weighed by the loss's gradient (loss_sensitivity)
    config = BudgetConfig(
        (300 if only_weighted else 800) * 16 * 4 // ratio,
        methods=NO_INT4,
        loss_sensitivity=ratio == 6,
        **SMALL,  # type: ignore[arg-type]
    )
    forward = _sparse_nn_loss
    only = (lambda _m, fqn: fqn.endswith("weighted_ebc")) if only_weighted else None
    reference = _sparse_nn(CPU)
    dmp = shard_model(_sparse_nn(META), CPU)
    load_full_state_dict_(dmp, reference.state_dict())
    report = compress_(dmp, config, calibration=copy.copy(mine), forward_fn=forward, filter_fn=only)
    resharded = report.reshard(CPU)
    unsharded_plan = plan_budget(reference, config, everyone, only, forward)
    apply_stages(reference, report.plan, budget_stages(report.plan, config), everyone, forward)
    resharded.eval(), reference.eval()
    with torch.no_grad():  # eval mode: TestSparseNN returns its predictions
        got = torch.cat([resharded(b).flatten() for b in everyone])
        expected = torch.cat([reference(b).flatten() for b in everyone])
    return {
        "plan": _labels(report.plan),
        "unsharded_plan": _labels(unsharded_plan),
        "bytes": report.bytes_after,
        "budget": config.memory_budget_bytes,
        "error": float((got - expected).abs().max()),
        "loss_sensitivity": config.loss_sensitivity,
        "prices": [p.price for p in report.plan],
        "unsharded_prices": [p.price for p in unsharded_plan],
    }


def _run(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: _case(name, rank, world_size) for name in CASES}
    out["sparse_nn"] = [_sparse_nn_case(rank, world_size, ratio) for ratio in (2, 6)]
    out["sparse_nn"].append(_sparse_nn_case(rank, world_size, 4, only_weighted=True))
    dmp = shard_model(tiny_dlrm(META, seed=11).model, CPU, sharding_type="table_wise")
    mine = [tiny_batch(16, seed=300 + rank)]
    forward = lambda m, b: m(b.dense_features, b.sparse_features)  # noqa: E731
    try:
        compress_(dmp, BudgetConfig(1000, **SMALL), calibration=mine, forward_fn=forward)  # type: ignore[arg-type]
        out["unreachable"] = "no error"
    except ValueError as error:
        out["unreachable"] = str(error)
    # gather_rows: any order, repeats, a column-wise split table; an id out of range is named
    full = {k.removeprefix("model."): v for k, v in tiny_dlrm(CPU, seed=11).state_dict().items()}
    split = shard_model(tiny_dlrm(META, seed=11).model, CPU, sharding_type="column_wise")
    load_full_state_dict_(split, full)
    key = "sparse_arch.embedding_bag_collection.embedding_bags.t_f2.weight"
    ids = torch.tensor([299, 0, 7, 299])
    out["gathered"] = bool(
        torch.equal(gather_rows(split.state_dict()[key], ids, "t_f2", 16), full[key][ids])
    )
    try:
        gather_rows(split.state_dict()[key], torch.tensor([3, 300]), "t_f2", 16)
        out["out_of_range"] = "no error"
    except ValueError as error:
        out["out_of_range"] = str(error)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_multiprocess(_run, world_size=2)


@pytest.mark.parametrize("name", list(CASES))
def test_dmp_budget_equals_the_unsharded_model_compressed_by_the_same_plan(
    results: list[dict[str, Any]], name: str
) -> None:
    config = CASES[name][0]
    first = results[0][name]
    for rank_result in results:
        got = rank_result[name]
        assert got["plan"] == first["plan"], "the processes planned differently"
        assert got["error"] <= 1e-5, got
        assert got["unchanged"] == 0.0, "the original DMP model changed"
        assert got["bytes"] == got["planned"] <= config.memory_budget_bytes, got
        if got["same_plan"]:
            assert got["plan"] == got["unsharded_plan"], got
        assert "budget" in got["text"] and "plan (3 tables)" in got["text"], got["text"]


def test_dmp_budget_of_test_sparse_nn_equals_the_unsharded_model(
    results: list[dict[str, Any]],
) -> None:
    for rank_result in results:
        for got, first in zip(rank_result["sparse_nn"], results[0]["sparse_nn"], strict=True):
            assert got["error"] <= 1e-5, got
            assert got["bytes"] <= got["budget"], got
            assert got["plan"] == first["plan"], "the processes planned differently"
            if not any("pq" in label for _, label in got["unsharded_plan"]):
                assert got["plan"] == got["unsharded_plan"], got
            if got["plan"] == got["unsharded_plan"]:  # priced alike (loss gradients included)
                assert got["prices"] == pytest.approx(got["unsharded_prices"], rel=1e-6), got
    assert [got["loss_sensitivity"] for got in results[0]["sparse_nn"]] == [False, True, False]
    assert [name for name, _ in results[0]["sparse_nn"][2]["plan"]] == ["w0"]  # filter_fn


def test_dmp_budget_plans_what_a_sharded_model_can_hold(results: list[dict[str, Any]]) -> None:
    big_pq = results[0]["pq_holds_no_large_kept_table"]
    assert ("t_f1", "fp32") in big_pq["unsharded_plan"], big_pq  # what this case guards against
    assert all(label != "fp32" for _, label in big_pq["plan"]), big_pq
    small = results[0]["pq_keeps_a_small_table"]
    assert ("t_f1", "fp32") in small["unsharded_plan"], small
    assert ("t_f1", "fp32 as identity codes") in small["plan"], small
    assert small["methods"].count("kept") == 1, small
    assert results[0]["everything_fits"]["methods"] == ["kept"] * 3
    assert {label for _, label in results[0]["afm_then_rowwise"]["plan"]} >= {"fp16"}


def test_gather_rows_assembles_column_blocks_and_names_a_bad_id(
    results: list[dict[str, Any]],
) -> None:
    for rank_result in results:
        assert rank_result["gathered"] is True
        assert "row id 300 is outside [0, 300)" in rank_result["out_of_range"], rank_result


def test_dmp_budget_below_the_smallest_size_raises_on_every_process(
    results: list[dict[str, Any]],
) -> None:
    for rank_result in results:
        assert "give a budget of at least" in rank_result["unreachable"], rank_result
