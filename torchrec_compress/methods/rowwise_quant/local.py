"""The local driver of row-wise quantization: what ``compress_`` swaps in a plain model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import (
    FilterFn,
    factor_parent,
    find_embedding_bag_collections,
    table_owners,
)
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.methods.rowwise_quant.quantize import (
    TRAINABLE_DATA_TYPES,
    RowWiseQuantHandler,
    fp16_collection,
    quantize_collection,
)
from torchrec_compress.registry import ConversionPlan
from torchrec_compress.report import ReportRow


def plan_rowwise(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """Quantizes every selected ``EmbeddingBagCollection`` (and AFM factor collection).

    ``calibration`` and ``forward_fn`` are not needed: quantization uses the rows alone.  A
    collection none of whose tables changes is left in place; one whose tables are all fp16 or
    kept becomes a trainable :func:`fp16_collection`, any other TorchRec's quantized collection
    (:func:`quantize_collection`).
    """
    assert isinstance(config, RowWiseQuantConfig)
    ebcs = find_embedding_bag_collections(model, filter_fn, lowrank_factors=config.factor_tables)
    table_owners(ebcs, config.table_overrides)
    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    handler = RowWiseQuantHandler(config)
    for fqn, ebc in ebcs.items():
        data_types, collection_rows = handler.plan(ebc)
        rows += collection_rows
        if all(r.method == "kept" for r in collection_rows):
            continue
        if all(t in TRAINABLE_DATA_TYPES for t in data_types.values()):
            module: nn.Module = fp16_collection(ebc, data_types)
        else:
            module = quantize_collection(ebc, data_types)
        lowrank = factor_parent(model, fqn)
        if lowrank is None:
            replacements[fqn] = module
        else:
            replacements[fqn.rpartition(".")[0]] = lowrank.with_factor_collection(module)
    return ConversionPlan(replacements, rows)
