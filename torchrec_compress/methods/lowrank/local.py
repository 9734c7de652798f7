"""The local driver of AFM / SVD: plans the low-rank compression of an unsharded model.

Statistics (one calibration pass: lookup counts and Linear output moments), bases and ranks
(:class:`~torchrec_compress.methods.lowrank.handler.LowRankHandler`), factor tables and thin
layers; ``compress_`` swaps the planned modules in only when every one succeeded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.calibration import ForwardFn, calibrate
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import (
    FilterFn,
    find_embedding_bag_collections,
    find_mlp_hidden_linears,
    no_linear_reason,
    table_owners,
)
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankConfig
from torchrec_compress.methods.lowrank.factors import (
    PrincipalBasis,
    factor_table,
    projection,
    table_moments,
)
from torchrec_compress.methods.lowrank.handler import LowRankHandler, linear_factors
from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
from torchrec_compress.methods.lowrank.rank import RankChoice
from torchrec_compress.moments import Moments
from torchrec_compress.registry import ConversionPlan, handler_for
from torchrec_compress.report import ReportRow


def plan_lowrank(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """AFM / SVD: statistics -> bases -> ranks (:func:`choose_ranks`) -> factors, for every
    selected table (:func:`_lowrank_collection`) and hidden MLP layer (:func:`linear_factors`)."""
    assert isinstance(config, LowRankConfig)
    is_afm = isinstance(config, AFMConfig)
    ebcs = find_embedding_bag_collections(model, filter_fn) if config.embeddings else {}
    linears = (
        find_mlp_hidden_linears(model, config.keep_mlp_ends, filter_fn) if config.linear else {}
    )
    table_owners(ebcs, config.table_overrides)
    if config.linear and not linears and ebcs:
        reason = no_linear_reason(model, config.keep_mlp_ends)
        warnings.warn(f"linear=True found no Linear layer to compress: {reason}", stacklevel=3)
    counts: dict[str, dict[str, torch.Tensor]] = {}
    linear_moments: dict[str, Moments] = {}
    if is_afm and (ebcs or linears):
        if calibration is None:
            raise ValueError("AFMConfig needs calibration data (an iterable of batches)")
        counts, linear_moments = calibrate(model, calibration, forward_fn, ebcs, linears)

    handler = handler_for(config)
    assert isinstance(handler, LowRankHandler)
    moments = {
        t.name: table_moments(
            ebc.embedding_bags[t.name].weight,
            counts[fqn][t.name] if handler.needs_lookup_counts else None,
            t.name,
        )
        for fqn, ebc in ebcs.items()
        for t in ebc.embedding_bag_configs()
    }
    tables = [t for ebc in ebcs.values() for t in ebc.embedding_bag_configs()]
    bases, choices = handler.fit(tables, moments)
    del counts  # float64 per row (160 MB for 20M rows): not needed by the factor tables

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        module, table_rows = _lowrank_collection(ebc, bases, choices, handler)
        rows += table_rows
        if module is not None:
            replacements[fqn] = module
    for fqn, layer in linears.items():
        row, new = linear_factors(fqn, layer, linear_moments[fqn] if is_afm else None, config)
        rows.append(row)
        if new is not None:
            replacements[fqn] = new
    return ConversionPlan(replacements, rows)


def _lowrank_collection(
    ebc: EmbeddingBagCollection,
    bases: Mapping[str, PrincipalBasis],
    choices: Mapping[str, RankChoice],
    handler: LowRankHandler,
) -> tuple[LowRankEmbeddingBagCollection | None, list[ReportRow]]:
    """One collection's low-rank replacement (kept tables at full width inside it), or ``None``
    when every table is kept, and its report rows."""
    tables = ebc.embedding_bag_configs()
    rows = [
        handler.table_row(
            t, bases[t.name], choices[t.name], ebc.embedding_bags[t.name].weight.element_size()
        )
        for t in tables
    ]
    table_ranks = {t.name: k for t in tables if (k := choices[t.name].rank) is not None}
    if not table_ranks:
        return None, rows
    module = LowRankEmbeddingBagCollection(tables, table_ranks, ebc.is_weighted(), ebc.device)
    for t in tables:
        weight, k = ebc.embedding_bags[t.name].weight, choices[t.name].rank
        if k is None:
            module.load_table_(t.name, weight)
        else:
            basis = bases[t.name]
            # written straight into the new module (one N x k factor table, not two); load_table_
            # then copies it onto itself, which torch skips
            factors = factor_table(weight, basis, k, out=module.factor_rows(t.name))
            module.load_table_(t.name, factors, projection(basis, k), basis.mean.to(torch.float32))
    return module, rows
