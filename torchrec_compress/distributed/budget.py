"""``compress_(dmp, BudgetConfig(...))``: one byte budget over a sharded model's tables.

:func:`compress_sharded_within_budget` plans on the sharded model
(:func:`~torchrec_compress.budget.sharded.sharded_plan`: statistics where the rows live, only
sampled rows gathered, process 0 allocating) and applies the plan as the unsharded budget does,
as at most three ordinary configs with per-table overrides (AFM, then PQ / MEC, then row-wise
bits), each through the sharded driver
(:func:`~torchrec_compress.distributed.compression.compress_sharded_model`).  Between two
stages the intermediate model is resharded (its tables table- or row-wise, which every next
stage takes), so each stage reads the previous one's rows where they live; an original whose
tables are split by columns is resharded so first.  The result is a
:class:`ShardedBudgetReport`: like every sharded report, :meth:`~ShardedCompressionReport.reshard`
builds the compressed model.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.budget.driver import (
    TablePlan,
    annotate_rows,
    budget_stages,
    followed_by,
    kept_row,
    plan_lines,
    stage_filter,
)
from torchrec_compress.budget.sharded import sharded_plan
from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import FilterFn
from torchrec_compress.distributed.compression import (
    ShardedCompressionReport,
    check_finite_shards,
    compress_sharded_model,
)
from torchrec_compress.distributed.tables import row_ranges
from torchrec_compress.layout import CompressionLayout, compression_layout
from torchrec_compress.report import CompressionReport
from torchrec_compress.skeleton import unsharded_skeleton

#: how the model between two stages is sharded: whole rows, which every stage takes
WHOLE_ROWS = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]


@dataclass
class ShardedBudgetReport(ShardedCompressionReport):
    """A :class:`ShardedCompressionReport` with the budget's plan: per table the option chosen,
    its bytes and estimated error (also each row's ``note``), and the configs that applied it.

    Example::

        >>> # every process (see tests/distributed/test_budget_dmp.py):
        >>> # report = compress_(dmp, BudgetConfig(memory_budget_bytes=2**20), my_batches)
        >>> # compressed_dmp = report.reshard(torch.device("cpu"))
    """

    budget: int = 0
    plan: list[TablePlan] = field(default_factory=list)
    stages: list[CompressionConfig] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([CompressionReport.__str__(self), *plan_lines(self.budget, self.plan)])

    def layout(self) -> CompressionLayout:
        """The layout of the compressed model, naming every stage's config."""
        if self.compressed_model is None:
            raise ValueError("this report has no compressed model")
        return compression_layout(self.compressed_model, self.stages)


def _whole_rows(plan: list[TablePlan]) -> dict[str, ParameterConstraints]:
    return {p.name: ParameterConstraints(sharding_types=list(WHOLE_ROWS)) for p in plan}


def _split_by_columns(state: dict[str, Any], plan: list[TablePlan], dims: dict[str, int]) -> bool:
    """Whether a planned table of a DMP state dict is split by columns (which the quantizers
    refuse: a row's code or scale needs the whole row)."""
    return any(
        len(rows.blocks) > 1
        for p in plan
        for rows in row_ranges(
            state[f"{p.collection}.embedding_bags.{p.name}.weight"], p.name, dims[p.name]
        )
    )


def compress_sharded_within_budget(
    model: DistributedModelParallel,
    config: BudgetConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
    meta_model: nn.Module | None = None,
) -> ShardedBudgetReport:
    """Plans and applies ``config`` to a DMP model (collective; see the module notes).

    ``model`` is left unchanged.  ``calibration`` (this process's batches, as many on every
    process) is held as a list: the plan and every stage read it.  A plan that keeps every
    table returns the model's own architecture and state, which ``reshard`` re-plans.

    Raises:
        ValueError: without calibration data; on every process, naming the smallest reachable
            size when the budget is below it; on processes spread over several hosts when the
            plan needs a reshard before or between its stages (those go through a temporary
            checkpoint on one host's disk, as ``reshard`` without ``checkpoint_dir`` does).
        NotImplementedError: for objectives that need per-table losses
            (:func:`~torchrec_compress.budget.sharded.sharded_config`).
    """
    if calibration is None:
        raise ValueError("BudgetConfig needs calibration data (an iterable of batches)")
    batches = list(calibration)
    if not batches:
        raise ValueError(f"calibration data {type(calibration).__name__} yielded no batch")
    skeleton = meta_model if meta_model is not None else unsharded_skeleton(model)
    check_finite_shards(model, skeleton, filter_fn)
    plan = sharded_plan(model, skeleton, config, batches, filter_fn, forward_fn)
    stages = budget_stages(plan, config)
    rows = {p.name: kept_row(skeleton, p) for p in plan}
    state = model.state_dict()
    report = ShardedCompressionReport([], skeleton, state, None)
    current = model
    if stages and _split_by_columns(state, plan, {n: r.shape[1] for n, r in rows.items()}):
        current = report.reshard(model.device, constraints=_whole_rows(plan))
    for i, (stage, collections) in enumerate(stages):
        if i:
            current = report.reshard(model.device, constraints=_whole_rows(plan))
        report = compress_sharded_model(
            current, stage, list(batches), stage_filter(collections), forward_fn
        )
        followed_by(rows, [r for r in report.rows if r.kind == "table"])
        if current is not model:  # an intermediate model: freed while the process group lives
            current = model
            gc.collect()
    ordered = [rows[p.name] for p in plan]
    annotate_rows(ordered, plan)
    return ShardedBudgetReport(
        ordered,
        report.compressed_model,
        report.state,
        report.config,
        config.memory_budget_bytes,
        plan,
        [c for c, _ in stages],
    )
