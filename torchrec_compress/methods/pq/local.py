"""The local driver of MEC / PQ: plans the product quantization of an unsharded model.

Lookup counts (one calibration pass), then per table a quantizer fitted and the rows encoded
(:class:`~torchrec_compress.methods.pq.handler.PQHandler`); in a low-rank model the factor
tables are quantized instead (the low-rank collection gets a product-quantized factor
collection).  ``compress_`` swaps the planned modules in only when every one succeeded.
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
    factor_parent,
    find_embedding_bag_collections,
    table_owners,
)
from torchrec_compress.methods.pq.config import MECConfig
from torchrec_compress.methods.pq.handler import PQHandler
from torchrec_compress.methods.pq.metrics import code_usage
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.registry import ConversionPlan, handler_for
from torchrec_compress.report import ReportRow


def plan_mec(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """Product-quantizes every selected table (MEC or plain weighted k-means, ``config.mode``).

    Lookup counts come from one calibration pass (:func:`calibrate`); each table that
    quantization makes smaller is quantized by :func:`~torchrec_compress.methods.pq.train_pq_table` on
    CPU.  A table is kept (with a note and a warning) when ``M`` does not divide its dimension
    or its codes and codebooks would not be smaller than its rows; a table skipped by an
    override is kept too.  A kept table inside a collection that has quantized tables is
    stored exactly, as ``N`` codewords of one subspace (its rows) and identity codes, so the
    collection stays one module; a collection with no quantized table is left as it is.

    In a low-rank model (after ``compress_`` with :class:`AFMConfig`) the k-dim factor tables
    are quantized instead (rows x M codes, then the projection back to d): the factor columns
    are first reordered so that every subspace gets an equal share of the principal
    components' variance (:func:`~torchrec_compress.methods.pq.subspace_order`), and the projection
    rows with them.
    """
    assert isinstance(config, MECConfig)
    handler = handler_for(config)
    assert isinstance(handler, PQHandler)
    ebcs = find_embedding_bag_collections(model, filter_fn, lowrank_factors=True)
    table_owners(ebcs, config.table_overrides)
    reasons = {
        t.name: handler.keep_reason(t) for ebc in ebcs.values() for t in ebc.embedding_bag_configs()
    }
    counts: dict[str, dict[str, torch.Tensor]] = {}
    if config.popularity_weighting and any(r is None for r in reasons.values()):
        if calibration is None:
            raise ValueError(
                "MECConfig(popularity_weighting=True) needs calibration data (an iterable of "
                "batches) for the lookup counts; pass calibration= or popularity_weighting=False"
            )
        counts, _ = calibrate(model, calibration, forward_fn, ebcs)
    _warn_kept_tables(reasons, handler.method)

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        module, table_rows = _quantize_collection(model, fqn, ebc, handler, reasons, counts)
        rows += table_rows
        if module is not None:
            replacements[module[0]] = module[1]
    return ConversionPlan(replacements, rows)


def _warn_kept_tables(reasons: Mapping[str, str | None], config_name: str) -> None:
    kept = {n: r for n, r in reasons.items() if r is not None and not r.startswith("skipped")}
    if kept:
        text = "; ".join(f"table {n!r}: {r}" for n, r in kept.items())
        warnings.warn(
            f"{config_name} keeps {len(kept)} table(s) uncompressed: {text}", stacklevel=4
        )


def _quantize_collection(
    model: nn.Module,
    fqn: str,
    ebc: EmbeddingBagCollection,
    handler: PQHandler,
    reasons: Mapping[str, str | None],
    counts: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[tuple[str, nn.Module] | None, list[ReportRow]]:
    """One collection's replacement (fqn, module), or ``None`` when no table is quantized (or
    the quantized collection would not be smaller), and its report rows."""
    tables = ebc.embedding_bag_configs()
    weights = {t.name: ebc.embedding_bags[t.name].weight.detach() for t in tables}
    if all(reasons[t.name] is not None for t in tables):
        return None, [
            handler.kept_row(t, reasons[t.name], bytes_per_element=weights[t.name].element_size())
            for t in tables
        ]
    lowrank = factor_parent(model, fqn)
    factor_ranks = lowrank.ranks() if lowrank is not None else {}
    codes: dict[str, torch.Tensor] = {}
    codebooks: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    rows: list[ReportRow] = []
    for t in tables:
        weight = weights[t.name]
        if weight.device.type == "meta":
            raise ValueError(f"table {t.name!r}: its weights are on the meta device")
        reason = reasons[t.name]
        if reason is not None:
            codes[t.name] = torch.arange(t.num_embeddings).unsqueeze(1)
            codebooks[t.name] = weight.float().cpu().unsqueeze(0)
            size = weight.element_size()
            # the collection derives identity codes: the table takes its rows' bytes alone
            row = handler.kept_row(t, reason, True, bytes_per_element=size, holds_codes=False)
            rows.append(row)
            continue
        table_counts = counts[fqn][t.name].cpu() if counts else None
        weight = weight.cpu()
        if t.name in factor_ranks:
            orders[t.name] = handler.subspace_order(weight, table_counts, t.name)
            weight = weight[:, orders[t.name]]
        quantizer = handler.fit(weight, table_counts, t.name)
        codebooks[t.name] = handler.codebooks(quantizer)
        codes[t.name] = handler.encode(quantizer, weight, t.name)
        usage = code_usage(codes[t.name], codebooks[t.name].shape[1])
        size = weights[t.name].element_size()
        rows.append(handler.table_row(t, codebooks[t.name], usage, size))
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    if after >= before:
        note = f"collection {fqn!r} would not be smaller quantized ({after} >= {before} bytes)"
        return None, [
            handler.kept_row(t, note, bytes_per_element=weights[t.name].element_size())
            for t in tables
        ]
    module = PQEmbeddingBagCollection(tables, codes, codebooks, ebc.is_weighted()).to(ebc.device)
    if lowrank is None:
        return (fqn, module), rows
    return (fqn.rpartition(".")[0], lowrank.with_factor_collection(module, orders)), rows
