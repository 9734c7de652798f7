"""``compress_`` with a :class:`~torchrec_compress.budget.config.BudgetConfig`: plan, then apply.

:func:`plan_budget` counts lookups (one calibration pass), lists every table's options
(:mod:`~torchrec_compress.budget.options`), estimates their errors
(:mod:`~torchrec_compress.budget.cost`) and allocates the budget
(:mod:`~torchrec_compress.budget.allocate`).  :func:`budget_stages` turns the plan into at most
three ordinary configs with per-table overrides (AFM ranks; then PQ of the rows or of the factor
tables; then row-wise bits), each restricted to the collections it changes, and
:func:`compress_within_budget` runs their local drivers in turn, restoring every collection it
changed if one fails.  Plain (unsharded) models; a DMP model's plan is made by
:mod:`~torchrec_compress.budget.sharded` and applied by :mod:`torchrec_compress.distributed.budget`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.budget.allocate import TableChoices, allocate
from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.budget.cost import TableErrors, estimate_errors
from torchrec_compress.budget.fisher import fisher_deltas
from torchrec_compress.budget.loss_delta import candidates, loss_deltas
from torchrec_compress.budget.options import Option, table_options
from torchrec_compress.budget.sensitivity import loss_sensitivity
from torchrec_compress.calibration import ForwardFn, calibrate
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import FilterFn, find_embedding_bag_collections, table_owners
from torchrec_compress.guards import check_finite_tables
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride
from torchrec_compress.methods.pq.config import MECConfig, MECOverride, PQConfig
from torchrec_compress.methods.rowwise_quant.config import (
    RowWiseQuantConfig,
    RowWiseQuantOverride,
)
from torchrec_compress.registry import method_of
from torchrec_compress.report import CompressionReport, ReportRow


@dataclass
class TablePlan:
    """What the budget chose for one table.

    Args:
        name (str): the table.
        collection (str): fully qualified name of its collection.
        option (Option): the chosen option (its ``bytes`` are the table's bytes after).
        bytes_before (int): the table's bytes before.
        relative_error (float): the estimated output error of the option, as a fraction of the
            table's output variance (0: lossless).
        options (int): how many options were considered.
        price (float): the allocator's cost of the option (the objective's units: scaled
            squared error, or the measured loss increase).
    """

    name: str
    collection: str
    option: Option
    bytes_before: int
    relative_error: float
    options: int
    price: float = 0.0

    @property
    def note(self) -> str:
        """What the report's row says about it."""
        return f"budget: {self.option.label}, est. rel. error {self.relative_error:.3g}"


@dataclass
class BudgetReport(CompressionReport):
    """A :class:`CompressionReport` with the plan: per table the option chosen, its bytes and
    its estimated error (also each row's ``note``), and the configs that applied it."""

    budget: int = 0
    plan: list[TablePlan] = field(default_factory=list)
    stages: list[CompressionConfig] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *plan_lines(self.budget, self.plan)])


def plan_lines(budget: int, plan: Sequence[TablePlan]) -> list[str]:
    """The lines a budget report adds to its table: the budget, then one line per table."""
    lines = [
        f"  {p.name}: {p.option.label}, {p.option.bytes:,} bytes, est. rel. error "
        f"{p.relative_error:.4g}, price {p.price:.4g}"
        for p in plan
    ]
    return [f"budget {budget:,} bytes, plan ({len(plan)} tables):", *lines]


def _scale(errors: TableErrors, config: BudgetConfig, gradient: float) -> float:
    factor = config.sensitivity.get(errors.name, 1.0) * gradient
    if config.error == "relative":
        return factor / max(errors.lookups * errors.variance, 1e-300)
    return factor


def table_choices(
    collection: str,
    options: Sequence[Option],
    errors: TableErrors,
    config: BudgetConfig,
    gradient: float = 1.0,
    pq_keeps: bool = True,
) -> TableChoices:
    """One table's options priced by their estimated errors, scaled as ``config`` says."""
    scale = _scale(errors, config, gradient)
    costs = [errors.errors[o] * scale for o in options]
    return TableChoices(errors.name, collection, list(options), costs, pq_keeps)


def table_plans(
    choices: Sequence[TableChoices], errors: dict[str, TableErrors], budget: int
) -> list[TablePlan]:
    """The allocator's choice (:func:`~torchrec_compress.budget.allocate.allocate`) as plans.

    Raises:
        ValueError: naming the smallest reachable size when ``budget`` is below it.
    """
    chosen = allocate(choices, budget)
    return [
        TablePlan(
            c.name,
            c.collection,
            chosen[c.name],
            c.options[0].bytes,
            errors[c.name].relative(chosen[c.name]),
            len(c.options),
            c.costs[c.options.index(chosen[c.name])],
        )
        for c in choices
    ]


def selected_collections(model: nn.Module, filter_fn: FilterFn | None) -> dict[str, Any]:
    """The uncompressed collections a budget plans for (``model``: plain, or a DMP model's
    unsharded skeleton).

    Raises:
        ValueError: when there is none.
    """
    ebcs = find_embedding_bag_collections(model, filter_fn)
    if not ebcs:
        raise ValueError(
            f"BudgetConfig found nothing to compress in {type(model).__name__}: no uncompressed "
            "EmbeddingBagCollection (after filter_fn, if given)"
        )
    return ebcs


def _loss_delta_choices(
    model: nn.Module,
    choices: Sequence[TableChoices],
    errors: dict[str, TableErrors],
    ebcs: dict[str, EmbeddingBagCollection],
    batches: Sequence[Any],
    forward_fn: ForwardFn,
    config: BudgetConfig,
) -> list[TableChoices]:
    """``choices`` narrowed to their candidates, priced by the loss they add
    (:mod:`~torchrec_compress.budget.loss_delta` or :mod:`~torchrec_compress.budget.fisher`),
    times ``config.sensitivity``."""
    picked = {c.name: candidates(c) for c in choices}
    tables = {
        c.name: (
            ebcs[c.collection],
            errors[c.name].reconstruct,
            [c.options[i] for i in picked[c.name] if c.options[i].kind != "fp32"],
        )
        for c in choices
    }
    measure = fisher_deltas if config.objective == "fisher" else loss_deltas
    deltas = measure(model, batches, forward_fn, tables)  # type: ignore[arg-type]
    narrowed = []
    for c in choices:
        options = [c.options[i] for i in picked[c.name]]
        factor = config.sensitivity.get(c.name, 1.0)
        costs = [deltas[c.name].get(o, 0.0) * factor for o in options]
        narrowed.append(TableChoices(c.name, c.collection, options, costs))
    return narrowed


def plan_budget(
    model: nn.Module,
    config: BudgetConfig,
    calibration: Sequence[Any],
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> list[TablePlan]:
    """The option of every selected table (see the module notes); the model is not changed.

    Raises:
        ValueError: naming the smallest reachable size when the budget is below it; naming
            unknown tables of ``sensitivity``; when no table is selected.
    """
    ebcs = selected_collections(model, filter_fn)
    table_owners(ebcs, config.sensitivity)
    check_finite_tables(ebcs.values())
    # fits see one half of the batches, errors are measured on the other's lookups
    halves = calibration_halves(calibration)
    counts, held_out = (calibrate(model, half, forward_fn, ebcs)[0] for half in halves)
    gradients: dict[str, float] = {}
    if config.loss_sensitivity:
        gradients = loss_sensitivity(model, calibration, forward_fn, ebcs)
    choices: list[TableChoices] = []
    errors: dict[str, TableErrors] = {}
    for fqn, ebc in ebcs.items():
        for t in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[t.name].weight
            options = table_options(t, weight.element_size(), weight.device, config)
            errors[t.name] = estimate_errors(
                t, weight, counts[fqn][t.name], held_out[fqn][t.name], options, config
            )
            gradient = gradients.get(t.name, 1.0)
            choices.append(table_choices(fqn, options, errors[t.name], config, gradient))
    if config.objective != "squared_error":
        batches = halves[1][: config.loss_batches]
        choices = _loss_delta_choices(model, choices, errors, ebcs, batches, forward_fn, config)
    return table_plans(choices, errors, config.memory_budget_bytes)


def calibration_halves(calibration: Sequence[Any]) -> tuple[Sequence[Any], Sequence[Any]]:
    """The batches the fits see and those the errors are measured on (every other batch)."""
    return (calibration[0::2], calibration[1::2]) if len(calibration) > 1 else (calibration,) * 2


def _collections(plan: Sequence[TablePlan], wanted: Any) -> set[str]:
    return {p.collection for p in plan if wanted(p.option)}


def budget_stages(
    plan: Sequence[TablePlan], config: BudgetConfig
) -> list[tuple[CompressionConfig, set[str]]]:
    """The configs that apply ``plan``, in order, each with the collections it compresses:
    AFM (ranks by override, the other tables of those collections skipped), then PQ / MEC
    (``M`` by override, of the rows or of AFM's factor tables; an ``"identity"`` option's
    ``M`` is one at which the quantizer keeps the table as identity codes), then row-wise bits.

    Example::

        >>> plan = [TablePlan("a", "ebc", Option("afm+pq", 1, rank=8, subspaces=2), 9, 0.1, 5),
        ...         TablePlan("b", "ebc", Option("fp32", 9), 9, 0.0, 5)]
        >>> [(type(c).__name__, sorted(c.table_overrides)) for c, _ in budget_stages(plan, BudgetConfig(1))]
        [('AFMConfig', ['a', 'b']), ('PQConfig', ['a', 'b'])]
    """
    stages: list[tuple[CompressionConfig, set[str]]] = []
    afm = _collections(plan, lambda o: o.rank is not None)
    if afm:
        overrides = {
            p.name: LowRankOverride(rank=p.option.rank)
            if p.option.rank is not None
            else LowRankOverride(skip=True)
            for p in plan
            if p.collection in afm
        }
        rank = min(p.option.rank for p in plan if p.option.rank is not None)
        stages.append((AFMConfig(rank=rank, table_overrides=overrides, rank_multiple=1), afm))
    pq = _collections(plan, lambda o: o.subspaces is not None)
    if pq:
        pq_overrides = {
            p.name: MECOverride(num_subspaces=p.option.subspaces)
            if p.option.subspaces is not None
            else MECOverride(skip=True)
            for p in plan
            if p.collection in pq
        }
        storage = dict(num_centroids=config.num_centroids, weighting=config.weighting)
        m = min(p.option.subspaces for p in plan if p.option.subspaces is not None)
        quantizer: CompressionConfig = (
            PQConfig(m, table_overrides=pq_overrides, **storage)  # type: ignore[arg-type]
            if config.pq_mode == "pq"
            else MECConfig(m, table_overrides=pq_overrides, mode="mec", **storage)  # type: ignore[arg-type]
        )
        stages.append((quantizer, pq))
    rowwise = _collections(plan, lambda o: o.bits is not None)
    if rowwise:
        bits = {
            p.name: RowWiseQuantOverride(bits=p.option.bits)
            if p.option.bits is not None
            else RowWiseQuantOverride(skip=True)
            for p in plan
            if p.collection in rowwise
        }
        stages.append((RowWiseQuantConfig(table_overrides=bits, factor_tables=True), rowwise))
    return stages


def stage_filter(collections: set[str]) -> FilterFn:
    def accept(module: nn.Module, fqn: str) -> bool:
        return fqn.removesuffix(".factor_ebc") in collections

    return accept


def kept_row(model: nn.Module, p: TablePlan) -> ReportRow:
    """The report row of a planned table before any stage (``model``: plain or a skeleton)."""
    ebc = model.get_submodule(p.collection)
    assert isinstance(ebc, EmbeddingBagCollection)
    weight = ebc.embedding_bags[p.name].weight
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    return ReportRow(p.name, "table", shape, "kept", None, p.bytes_before, p.bytes_before, None)


def followed_by(rows: dict[str, ReportRow], stage: Sequence[ReportRow]) -> None:
    """Each table's row after one more stage: a table kept so far takes the stage's row, a
    compressed one the two composed (``CompressionReport.followed_by``)."""
    for row in stage:
        now = rows[row.name]
        if now.method == "kept":
            rows[row.name] = row
        else:
            rows[row.name] = CompressionReport([now]).followed_by(CompressionReport([row])).rows[0]


def apply_stages(
    model: nn.Module,
    plan: Sequence[TablePlan],
    stages: Sequence[tuple[CompressionConfig, set[str]]],
    calibration: Sequence[Any],
    forward_fn: ForwardFn,
) -> CompressionReport:
    """Runs each stage's local driver and swaps its modules in; on any error every changed
    collection is put back and the error raised.  Returns the report of all stages together,
    one row per planned table."""
    rows = {p.name: kept_row(model, p) for p in plan}
    originals = {p.collection: model.get_submodule(p.collection) for p in plan}
    try:
        for config, collections in stages:
            method = method_of(config)
            stage = method.plan(model, config, calibration, stage_filter(collections), forward_fn)
            for fqn, module in stage.replacements.items():
                parent, _, child = fqn.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
            followed_by(rows, [r for r in stage.rows if r.kind == "table"])
    except BaseException:
        for fqn, module in originals.items():
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        raise
    return CompressionReport([rows[p.name] for p in plan])


def annotate_rows(rows: Sequence[ReportRow], plan: Sequence[TablePlan]) -> None:
    """Writes each table's plan into its report row's note; warns where the bytes reported
    differ from the planned ones."""
    by_name = {p.name: p for p in plan}
    wrong = {}
    for row in rows:
        row.note = by_name[row.name].note
        if row.bytes_after != by_name[row.name].option.bytes:
            wrong[row.name] = (by_name[row.name].option.bytes, row.bytes_after)
    if wrong:
        warnings.warn(
            f"BudgetConfig: planned bytes differ from the report's {wrong} (planned, reported)",
            stacklevel=3,
        )


def compress_within_budget(
    model: nn.Module,
    config: BudgetConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> BudgetReport:
    """Plans (:func:`plan_budget`) and applies (:func:`apply_stages`) ``config`` to an
    unsharded ``model``, in place; ``calibration`` is held as a list (every stage reads it).

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=300, feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg]))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.arange(600) % 300, lengths=torch.full((300,), 2))
        >>> report = compress_within_budget(model, BudgetConfig(3000), [kjt], None, lambda m, b: m(b))
        >>> report.bytes_after <= 3000, report.plan[0].option.kind
        (True, 'int4')
    """
    if calibration is None:
        raise ValueError("BudgetConfig needs calibration data (an iterable of batches)")
    batches = list(calibration)
    if not batches:
        raise ValueError(f"calibration data {type(calibration).__name__} yielded no batch")
    plan = plan_budget(model, config, batches, filter_fn, forward_fn)
    stages = budget_stages(plan, config)
    report = apply_stages(model, plan, stages, batches, forward_fn)
    annotate_rows(report.rows, plan)
    return BudgetReport(report.rows, config.memory_budget_bytes, plan, [c for c, _ in stages])
