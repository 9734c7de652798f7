"""Byte-budget planning of a ``DistributedModelParallel`` model: no table is gathered.

The sharded counterpart of :func:`~torchrec_compress.budget.driver.plan_budget`.  It gives the plan
the unsharded planner gives for the same weights when each process holds an even number of
batches whose every other one, over all processes, are the unsharded planner's two halves (its
fits see the even-numbered batches, its errors the odd ones: a process with one batch uses it for
both), and the sharded model can hold that plan (see below):

1. two calibration passes (each process's batches split in halves, as the plain planner
   splits its list) count lookups as sparse ``(id, count)`` pairs, summed over the group;
2. each table's lookup-weighted moments are computed by the processes holding its rows and
   summed (as the sharded AFM driver computes them);
3. the held-out lookups and the product-quantization fitting rows, drawn as the plain planner
   draws them (the same ids on every process), are gathered: only those rows travel
   (:func:`~torchrec_compress.distributed.tables.gather_rows`);
4. process 0 estimates every option's error and allocates the budget; the plan, or the error
   (e.g. the smallest reachable size), is broadcast, so every process returns or raises alike.

Only what a sharded model can hold is offered: no int4 rows (torchrec 1.8 cannot DCP-save
them), and a product-quantized collection holds product-quantized tables and, as identity
codes, small tables that quantizing would not shrink (the sharded quantizer does not gather
a large table to keep it).  The ``"squared_error"`` objective, weighed by ``loss_sensitivity``
if asked (gradients at the sharded collections' outputs, summed over the group);
``"loss_delta"`` and ``"fisher"`` replace one table's rows in the model at a time and raise
``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.budget.allocate import TableChoices
from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.budget.cost import (
    Pairs,
    TableErrors,
    TableSamples,
    lookup_pairs,
    sample_errors,
    table_samples,
)
from torchrec_compress.budget.driver import (
    TablePlan,
    calibration_halves,
    selected_collections,
    table_choices,
    table_plans,
)
from torchrec_compress.budget.options import identity_option, table_options
from torchrec_compress.budget.sensitivity import loss_sensitivity
from torchrec_compress.calibration import ForwardFn
from torchrec_compress.discovery import FilterFn, table_owners
from torchrec_compress.distributed.tables import (
    SparseLookupCounter,
    gather_rows,
    global_lookup_pairs,
    lookup_counting_modules,
    sum_identical_,
)
from torchrec_compress.guards import DEFAULT_CHUNK_ROWS
from torchrec_compress.methods.lowrank.factors import PrincipalBasis, afm_basis
from torchrec_compress.methods.lowrank.sharded_driver import local_table_moments

#: option kinds a sharded model cannot take (int4 rows: torchrec 1.8 cannot DCP-save them)
SHARDED_UNSUPPORTED: tuple[str, ...] = ("int4", "afm+int4")


def sharded_config(config: BudgetConfig) -> BudgetConfig:
    """``config`` without the option kinds a sharded model cannot take.

    Raises:
        NotImplementedError: for the objectives that need per-table losses of the model.

    Example::

        >>> sharded_config(BudgetConfig(memory_budget_bytes=1, methods=("int4", "int8"))).methods
        ('int8',)
    """
    if config.objective != "squared_error":
        raise NotImplementedError(
            "BudgetConfig on a DistributedModelParallel model prices options by their "
            "squared output error (objective='squared_error', optionally weighed by "
            f"loss_sensitivity); got objective={config.objective!r}: compress the unsharded "
            "model for it, or use the default objective"
        )
    methods = tuple(m for m in config.methods if m not in SHARDED_UNSUPPORTED)
    return dataclasses.replace(config, methods=methods)


def _sharded_sensitivity(
    model: nn.Module,
    ebcs: Mapping[str, EmbeddingBagCollection],
    batches: Sequence[Any],
    forward_fn: ForwardFn,
) -> dict[str, float]:
    """:func:`~torchrec_compress.budget.sensitivity.loss_sensitivity` of a DMP model: each
    process's batches through the sharded collections' outputs, averaged over every process's
    batches (collective)."""
    inner = getattr(model, "module", model)
    outputs = {fqn: module for module, fqn in _output_modules(inner, ebcs).items()}
    local = loss_sensitivity(model, batches, forward_fn, ebcs, outputs)
    names = sorted(local)
    totals = torch.tensor(
        [local[n] * len(batches) for n in names] + [len(batches)], dtype=torch.float64
    )
    sum_identical_([totals], dist.group.WORLD)
    return {n: float(totals[i] / max(float(totals[-1]), 1.0)) for i, n in enumerate(names)}


def _output_modules(
    inner: nn.Module, ebcs: Mapping[str, EmbeddingBagCollection]
) -> dict[nn.Module, str]:
    """The module of the sharded model whose output is each collection's pooled output: the
    collection, or the sharded feature-processed collection around it."""
    return {
        module: fqn
        for fqn, ebc in ebcs.items()
        for module in lookup_counting_modules(
            inner, {fqn: SparseLookupCounter(ebc.embedding_bag_configs())}
        )
    }


def _table_samples(
    value: torch.Tensor, table: EmbeddingBagConfig, pairs: tuple[Pairs, Pairs], config: BudgetConfig
) -> tuple[PrincipalBasis, TableSamples]:
    """One table's fitted basis and samples, the same on every process (collective: the
    moments and the sampled rows need the processes holding them)."""
    moments = local_table_moments(value, table, pairs[0], DEFAULT_CHUNK_ROWS)
    sum_identical_([moments.count, moments.sum, moments.sum_outer], dist.group.WORLD)
    basis = afm_basis(moments, f"table {table.name!r}")
    fit, held_out = lookup_pairs(table.num_embeddings, *pairs)
    fetch = partial(gather_rows, value, name=table.name, dim=table.embedding_dim)
    return basis, table_samples(fetch, table.num_embeddings, fit, held_out, basis, config)


def sharded_plan(
    model: nn.Module,
    skeleton: nn.Module,
    config: BudgetConfig,
    batches: Sequence[Any],
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> list[TablePlan]:
    """The plan of every selected table (see the module notes; collective).

    Args:
        model (nn.Module): the ``DistributedModelParallel`` model (left unchanged).
        skeleton (nn.Module): its unsharded architecture (e.g. on ``meta``), same fqns.
        config (BudgetConfig): the budget.
        batches (Sequence[Any]): this process's calibration batches (as many on every process).
        filter_fn (Optional[FilterFn]): selects the skeleton's collections.
        forward_fn (ForwardFn): how to run ``model`` on one batch.

    Raises:
        NotImplementedError: for objectives other than the squared output error.
        ValueError: on every process, naming the smallest reachable size when the budget is
            below it; when no collection is selected.
    """
    config = sharded_config(config)
    ebcs = selected_collections(skeleton, filter_fn)
    table_owners(ebcs, config.sensitivity)
    tables = [(fqn, t) for fqn, ebc in ebcs.items() for t in ebc.embedding_bag_configs()]
    halves = calibration_halves(batches)
    fit, held_out = (global_lookup_pairs(model, ebcs, tables, half, forward_fn) for half in halves)
    gradients = (
        _sharded_sensitivity(model, ebcs, batches, forward_fn) if config.loss_sensitivity else {}
    )
    state = model.state_dict()
    device = getattr(model, "device", torch.device("cpu"))
    choices: list[TableChoices] = []
    errors: dict[str, TableErrors] = {}
    outcome: list[Any] = [None]  # process 0's plan, or the error it met
    for fqn, t in tables:
        value = state[f"{fqn}.embedding_bags.{t.name}.weight"]
        size = ebcs[fqn].embedding_bags[t.name].weight.element_size()  # the skeleton's
        options = table_options(t, size, device, config)
        identity = identity_option(t, config) if {"pq", "afm+pq"} & set(config.methods) else None
        options += [identity] if identity is not None else []
        basis, samples = _table_samples(value, t, (fit[t.name], held_out[t.name]), config)
        if dist.get_rank() != 0 or outcome[0] is not None:
            continue
        try:  # process 0's error must reach the others, not leave them waiting
            errors[t.name] = sample_errors(t.name, basis, samples, options, config)
        except Exception as error:
            outcome[0] = error
            continue
        gradient = gradients.get(t.name, 1.0)
        choices.append(table_choices(fqn, options, errors[t.name], config, gradient, False))
    if dist.get_rank() == 0 and outcome[0] is None:
        try:
            outcome[0] = table_plans(choices, errors, config.memory_budget_bytes)
        except Exception as error:  # every process must get it, not wait for the plan
            outcome[0] = error
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]  # the same error on every process
    return outcome[0]
