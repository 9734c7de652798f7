"""compress_ with BudgetConfig: one byte budget for the whole model, the best option per table.

On torchrec's DLRM (tables of different sizes, structure and popularity) and TestSparseNN (two
collections, one weighted): the budget is met for several budgets and every table's bytes are
the planned ones; a budget below the smallest reachable size raises naming it, and the model is
left unchanged; the popular table gets more bytes than a rarely read one of the same shape; the
report lists the plan; on a synthetic case the budget's pooled-output error is at most that of
the best single method at equal bytes; the compressed model runs and survives a state-dict
round trip through its layout.
"""

import copy
import re

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.test_utils.test_model import ModelInput, TestSparseNN
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from examples.dlrm.compression import BUDGET_METHODS, make_config
from examples.dlrm.main import parse_args
from torchrec_compress import BudgetConfig, BudgetReport, compress_
from torchrec_compress.budget.allocate import TableChoices, allocate, exact_spend, spend
from torchrec_compress.budget.config import OPTION_KINDS
from torchrec_compress.budget.options import Option
from torchrec_compress.budget.sharded import sharded_config
from torchrec_compress.layout import compression_layout, restore_layout_
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.pq.config import PQConfig
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 16
# name -> (rows, mean ids per sample, rank of the rows' structure: 0 = full rank)
TABLES = {
    "popular": (1500, 4.0, 0),
    "rare": (1500, 0.05, 0),
    "structured": (800, 1.0, 3),
    "tiny": (40, 1.0, 2),
}
FAST = {"sample_size": 1024, "fit_sample_size": 1024, "estimate_iterations": 4}


def _rows(rows: int, rank: int, g: torch.Generator) -> torch.Tensor:
    if rank == 0:
        return torch.randn(rows, DIM, generator=g)
    basis = torch.randn(rank, DIM, generator=g)
    return torch.randn(rows, rank, generator=g) @ basis + 0.05 * torch.randn(rows, DIM, generator=g)


def _collection(tables: dict = TABLES, seed: int = 0) -> EmbeddingBagCollection:
    g = torch.Generator().manual_seed(seed)
    configs = [
        EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=[f"f_{n}"])
        for n, (r, _, _) in tables.items()
    ]
    ebc = EmbeddingBagCollection(configs)
    with torch.no_grad():
        for n, (r, _, rank) in tables.items():
            ebc.embedding_bags[n].weight.copy_(_rows(r, rank, g))
    return ebc


def _features(tables: dict = TABLES, batch_size: int = 64, seed: int = 0) -> KeyedJaggedTensor:
    """Zipf-like ids (squares of uniforms), bags of Poisson(mean) ids."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for rows, mean, _ in tables.values():
        n = torch.poisson(torch.full((batch_size,), mean), generator=g).long()
        lengths.append(n)
        u = torch.rand(int(n.sum()), generator=g)
        values.append((u * u * rows).long().clamp(max=rows - 1))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f_{n}" for n in tables], values=torch.cat(values), lengths=torch.cat(lengths)
    )


def _dlrm(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(
        embedding_bag_collection=_collection(seed=seed),
        dense_in_features=4,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[16, 1],
    )


def _batches(num: int = 8) -> list[Batch]:
    return [
        Batch(
            torch.randn(64, 4, generator=torch.Generator().manual_seed(i)),
            _features(seed=i),
            torch.zeros(64),
        )
        for i in range(num)
    ]


def _total() -> int:
    return sum(r * DIM * 4 for r, _, _ in TABLES.values())


@pytest.mark.parametrize("ratio", [2, 5, 8, 12])
def test_budget_is_met_and_bytes_are_the_planned_ones(ratio: int) -> None:
    model, batches = _dlrm(), _batches()
    budget = _total() // ratio
    report = compress_(model, BudgetConfig(budget, **FAST), calibration=batches)
    assert isinstance(report, BudgetReport)
    assert report.bytes_before == _total()
    assert report.bytes_after <= budget
    planned = {p.name: p.option.bytes for p in report.plan}
    assert {r.name: r.bytes_after for r in report.rows} == planned
    # the budget is spent: less than the smallest step of any table is left over
    assert report.bytes_after > budget * 0.7
    model.eval()
    with torch.no_grad():
        out = model(batches[0].dense_features, batches[0].sparse_features)
    assert out.shape == (64, 1) and bool(torch.isfinite(out).all())


def test_a_collection_holds_product_or_rowwise_quantized_tables_not_both() -> None:
    for ratio in (3, 8, 12):
        report = compress_(_dlrm(), BudgetConfig(_total() // ratio, **FAST), calibration=_batches())
        families = {p.option.family for p in report.plan} - {"any"}
        assert report.plan  # packed AFM tables (family "float") neither
        assert len(families) <= 1, report


def test_unreachable_budget_names_the_smallest_size_and_leaves_the_model() -> None:
    model = _dlrm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"give a budget of at least (\d+)") as error:
        compress_(model, BudgetConfig(1000, **FAST), calibration=_batches())
    assert type(model.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    smallest = int(re.search(r"at least (\d+)", str(error.value)).group(1))  # type: ignore[union-attr]
    report = compress_(model, BudgetConfig(smallest, **FAST), calibration=_batches())
    assert report.bytes_after <= smallest


def test_the_popular_table_gets_more_bytes_than_a_rare_one_of_the_same_shape() -> None:
    report = compress_(_dlrm(), BudgetConfig(_total() // 10, **FAST), calibration=_batches())
    plan = {p.name: p for p in report.plan}
    assert plan["popular"].option.bytes > plan["rare"].option.bytes, report
    # a factor on a table's error says which one matters
    config = BudgetConfig(_total() // 10, sensitivity={"rare": 1e4}, **FAST)
    report = compress_(_dlrm(), config, calibration=_batches())
    plan = {p.name: p for p in report.plan}
    assert plan["rare"].option.bytes > plan["popular"].option.bytes, report


_WEIGHED = {"a": (1500, 1.0, 0), "b": (1500, 2.0, 0)}  # b read twice as often


class _WeighedLoss(nn.Module):
    """An EBC and a loss that depends on feature ``f_a`` ten times more than on ``f_b``."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = _collection(_WEIGHED)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.ebc(kjt)
        return (10 * out["f_a"] + out["f_b"]).pow(2).mean()


def _call(model: nn.Module, batch: KeyedJaggedTensor) -> torch.Tensor:
    return model(batch)


def test_loss_sensitivity_gives_more_bytes_to_the_table_the_loss_depends_on() -> None:
    batches = [_features(_WEIGHED, seed=i) for i in range(4)]
    budget = 30000 + 18000  # int8 for one table, int4 for the other
    for weighed, more in ((False, "b"), (True, "a")):
        config = BudgetConfig(budget, loss_sensitivity=weighed, **FAST)
        report = compress_(_WeighedLoss(), config, calibration=batches, forward_fn=_call)
        plan = {p.name: p.option for p in report.plan}
        less = "a" if more == "b" else "b"
        assert plan[more].bytes > plan[less].bytes, report
    config = BudgetConfig(budget, loss_sensitivity=True, **FAST)
    with pytest.raises(ValueError, match="needs forward_fn to return the loss"):
        compress_(_dlrm(), config, calibration=_batches(2))


class _TargetLoss(nn.Module):
    """An EBC near its loss's minimum: squared distance of the pooled outputs to targets (the
    exact ones plus small noise), ``f_a``'s weighed 100 times more than ``f_b``'s; the batch
    is (features, targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = _collection(_WEIGHED)

    def forward(self, batch: tuple) -> torch.Tensor:
        out = self.ebc(batch[0])
        a, b = (out[f] - batch[1][f] for f in ("f_a", "f_b"))
        return 100 * a.pow(2).sum(1).mean() + b.pow(2).sum(1).mean()


def test_loss_delta_gives_more_bytes_to_the_table_the_loss_depends_on() -> None:
    """``b`` is read twice as often, so its squared output error is larger at equal storage;
    the loss depends on ``a`` 100 times more: the squared-error objective favours ``b``, the
    measured loss increase ``a``."""
    model = _TargetLoss()
    with torch.no_grad():
        batches = []
        for i in range(6):
            kjt = _features(_WEIGHED, seed=i)
            g = torch.Generator().manual_seed(i)
            out = model.ebc(kjt)
            noisy = {f: out[f] + 0.01 * torch.randn(out[f].shape, generator=g) for f in out.keys()}
            batches.append((kjt, noisy))
    budget = 30000 + 18000  # int8 for one table, int4 for the other
    for objective, more in (("squared_error", "b"), ("loss_delta", "a"), ("fisher", "a")):
        config = BudgetConfig(budget, objective=objective, loss_batches=3, **FAST)
        report = compress_(_TargetLoss(), config, calibration=batches, forward_fn=_call)
        plan = {p.name: p.option for p in report.plan}
        less = "a" if more == "b" else "b"
        assert plan[more].bytes > plan[less].bytes, report
        assert report.bytes_after <= budget
    config = BudgetConfig(budget, objective="loss_delta", **FAST)
    with pytest.raises(ValueError, match="needs forward_fn to return the loss"):
        compress_(_dlrm(), config, calibration=_batches(2))


def test_the_allocator_is_exact_where_the_greedy_is_not() -> None:
    """Greedy on error saved per byte takes ``b``'s cheap step and then cannot afford ``a``'s;
    the exact merge of the tables' fronts spends the bytes on ``a``."""
    a = TableChoices("a", "c", [Option("fp32", 6), Option("int8", 1)], [0.0, 10.0])
    b = TableChoices("b", "c", [Option("fp32", 3), Option("int8", 1)], [0.0, 9.0])
    greedy = spend([a, b], {"c": "rowwise"}, 7)
    assert greedy is not None and greedy[0] == 10.0
    assert exact_spend([a, b], {"c": "rowwise"}, 7) == (9.0, {"a": 0, "b": 1})
    assert {n: o.kind for n, o in allocate([a, b], 7).items()} == {"a": "fp32", "b": "int8"}


def test_the_report_lists_the_plan() -> None:
    report = compress_(_dlrm(), BudgetConfig(_total() // 8, **FAST), calibration=_batches())
    text = str(report)
    assert f"budget {_total() // 8:,} bytes, plan (4 tables):" in text
    for p in report.plan:
        assert f"{p.name}: {p.option.label}, {p.option.bytes:,} bytes" in text
        assert 0.0 <= p.relative_error < 1.0
    assert all(r.note is not None and r.note.startswith("budget: ") for r in report.rows)
    assert [type(c).__name__ for c in report.stages]  # the configs that applied the plan


def _pooled_error(config: object, budget_tables: dict, batches: list) -> tuple[int, float]:
    """Bytes after and squared error of the pooled outputs, against the float collection."""
    model = nn.Sequential(_collection(budget_tables))
    reference = copy.deepcopy(model)
    report = compress_(model, config, calibration=batches, forward_fn=lambda m, b: m(b))  # type: ignore[arg-type]
    with torch.no_grad():
        error = sum(
            float(((model(b).values() - reference(b).values()) ** 2).sum()) for b in batches
        )
    return report.bytes_after, error


def test_budget_beats_every_single_method_at_equal_bytes() -> None:
    """One table is low-rank (AFM's case), one full-rank noise (row-wise quantization's case):
    no single method suits both; at the bytes of int4 everywhere the budget takes AFM for the
    first, int4 for the second, and loses less than half of what the best single method does."""
    tables = {"structured": (2000, 2.0, 2), "noise": (2000, 2.0, 0)}
    batches = [_features(tables, seed=i) for i in range(6)]
    budget = 2 * 2000 * 12  # both tables in int4
    singles = [
        AFMConfig(memory_budget_bytes=budget),
        RowWiseQuantConfig(bits=4),
        PQConfig(num_subspaces=8),
        PQConfig(num_subspaces=4),
        PQConfig(num_subspaces=2),
    ]
    errors = {}
    for config in singles:
        size, error = _pooled_error(config, tables, batches)
        if size <= budget:
            errors[str(config)] = error
    assert len(errors) >= 3  # AFM, int4, PQ M=2 fit
    size, error = _pooled_error(BudgetConfig(budget, **FAST), tables, batches)
    assert size <= budget
    assert error < 0.6 * min(errors.values()), (error, errors)


def _sparse_nn_inputs(tables: list, weighted: list) -> list[ModelInput]:
    torch.manual_seed(1)
    return [
        ModelInput.generate(
            batch_size=16,
            world_size=1,
            num_float_features=10,
            tables=tables,
            weighted_tables=weighted,
        )[0]
        for _ in range(4)
    ]


def test_test_sparse_nn_two_collections() -> None:
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=16, num_embeddings=r, feature_names=[f"f{i}"]
        )
        for i, r in enumerate((400, 100))
    ]
    weighted = [
        EmbeddingBagConfig(name="w0", embedding_dim=16, num_embeddings=300, feature_names=["w0"])
    ]
    torch.manual_seed(0)
    model = TestSparseNN(tables=tables, weighted_tables=weighted)
    batches = _sparse_nn_inputs(tables, weighted)
    total = 800 * 16 * 4
    for ratio in (2, 6):
        compressed = copy.deepcopy(model)
        report = compress_(
            compressed,
            BudgetConfig(total // ratio, **FAST),
            calibration=batches,
            forward_fn=lambda m, b: m(b),
        )
        assert report.bytes_before == total and report.bytes_after <= total // ratio
        compressed.eval()
        with torch.no_grad():
            assert bool(torch.isfinite(compressed(batches[0])[1]).all())


def test_the_layout_rebuilds_the_compressed_model_and_loads_its_state() -> None:
    """What save_compressed / load_compressed rely on: the layout of the budget's model rebuilds
    it from the uncompressed architecture, and its state dict loads into that."""
    model, batches = _dlrm(), _batches()
    report = compress_(model, BudgetConfig(_total() // 12, **FAST), calibration=batches)
    layout = compression_layout(model, report.stages)
    fresh = restore_layout_(_dlrm(seed=1), layout, device=torch.device("cpu"))
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    b = batches[0]
    with torch.no_grad():
        assert torch.equal(
            model(b.dense_features, b.sparse_features), fresh(b.dense_features, b.sparse_features)
        )


def test_dmp_budgets_refuse_what_a_sharded_model_cannot_price_or_hold() -> None:
    # before: every DMP model refused ("compress the model before sharding"); now planned on
    # the sharded model (tests/distributed/test_budget_dmp.py), except the loss objectives
    dmp = DistributedModelParallel.__new__(DistributedModelParallel)
    with pytest.raises(ValueError, match="yielded no batch"):
        compress_(dmp, BudgetConfig(1000), calibration=[])
    for bad in ({"objective": "fisher"}, {"objective": "loss_delta"}):
        with pytest.raises(NotImplementedError, match="squared output error"):
            sharded_config(BudgetConfig(1000, **bad))  # type: ignore[arg-type]
    assert "int4" not in sharded_config(BudgetConfig(1000)).methods
    assert "afm+int4" not in sharded_config(BudgetConfig(1000)).methods


def test_config_checks() -> None:
    assert BudgetConfig.from_dict(BudgetConfig(10, methods=["int8", "afm"]).to_dict()).methods == (
        "int8",
        "afm",
    )
    assert set(BudgetConfig(10).methods) == set(OPTION_KINDS)
    for bad in (
        {"memory_budget_bytes": 0},
        {"memory_budget_bytes": 1, "error": "x"},
        {"memory_budget_bytes": 1, "objective": "auc"},
        {"memory_budget_bytes": 1, "loss_batches": 0},
        {"memory_budget_bytes": 1, "sensitivity": {"t": 0.0}},
    ):
        with pytest.raises(ValueError, match="BudgetConfig"):
            BudgetConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['nope'\]"):
        compress_(_dlrm(), BudgetConfig(10**6, sensitivity={"nope": 2.0}), calibration=_batches(1))


def test_the_example_flag_makes_a_budget_of_the_total_bytes_over_the_ratio() -> None:
    config = make_config(parse_args(["--compress", "budget", "--budget-ratio", "16"]), 1600)
    assert isinstance(config, BudgetConfig)
    assert config.memory_budget_bytes == 100 and config.methods == BUDGET_METHODS
    # one process: the fisher objective by default (the loss's own measure was 0.015 AUC worse
    # at 16x on the synthetic default); an explicit objective is kept
    assert config.objective == "fisher" and not config.loss_sensitivity
    explicit = parse_args(
        ["--compress", "budget", "--budget-ratio", "16", "--budget-objective", "loss"]
    )
    assert make_config(explicit, 1600).loss_sensitivity  # type: ignore[union-attr]
    with pytest.raises(SystemExit, match="--budget-ratio"):
        make_config(parse_args(["--compress", "budget"]), 1600)
