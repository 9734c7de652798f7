"""Row-wise quantization (``RowWiseQuantConfig``) of a ``DistributedModelParallel`` model.

The sharded route of ``torchrec_compress.compress_(dmp, RowWiseQuantConfig(...))``: every row is
quantized independently (its own fp16 scale and bias), so each process quantizes the rows it
holds, block by block, exactly as the unsharded :func:`~torchrec_compress.methods.rowwise_quant.method.quantize_collection`
would; no rows move.  Table-wise and row-wise shards are quantized where they live; a
data-parallel (replicated) table by process 0 alone; a column-wise split table is refused (a row's
scale needs the whole row).  The result is the compressed state, its quantized rows as row-sharded
``ShardedTensor`` s laid out like the float rows, which ``report.reshard`` loads through DCP.

After ``reshard`` an int8 collection is TorchRec's quantized collection, kept whole on every
process (frozen rows, see :func:`~torchrec_compress.distributed.planning.training_sharders`);
an fp16 one (``bits=16``) is an ordinary collection, sharded by the planner and trainable.
int4 / int2 rows are refused here: torchrec 1.8 cannot DCP-save them (its ``UInt4Tensor`` lacks
``is_pinned``); quantize those before sharding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.discovery import (
    FilterFn,
    factor_parent,
    find_embedding_bag_collections,
    table_owners,
)
from torchrec_compress.distributed.tables import (
    check_compressed_state,
    local_blocks,
    row_ranges,
    row_sharded_tensor,
)
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.methods.rowwise_quant.quantize import (
    TRAINABLE_DATA_TYPES,
    RowWiseQuantHandler,
    empty_rowwise_collection,
)
from torchrec_compress.registry import handler_for
from torchrec_compress.report import CompressionReport

META = torch.device("meta")
# fbgemm n-bit types torchrec 1.8 wraps in UInt4Tensor / UInt2Tensor, which DCP cannot save
NOT_CHECKPOINTABLE = (DataType.INT4, DataType.INT2)


def _quantized_table_state(
    weight: torch.Tensor, table: EmbeddingBagConfig, data_type: DataType, quantized: bool
) -> dict[str, torch.Tensor]:
    """One table's stored entries (suffix -> row-sharded ``ShardedTensor``), each block of rows
    quantized by the process holding it (collective)."""
    ranges = row_ranges(weight, table.name, table.embedding_dim)
    split = [r for r in ranges if len(r.blocks) > 1]
    if split:
        raise ValueError(
            f"table {table.name!r} is split by columns (rows {split[0].row}.."
            f"{split[0].row + split[0].rows} over ranks {sorted(split[0].ranks)}): row-wise "
            "quantization needs whole rows; shard it table-wise or row-wise first"
        )
    local = local_blocks(weight, dist.get_rank())
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for rows in ranges:
        block = local.get((rows.row, 0))
        if block is None:
            continue
        for suffix, value in RowWiseQuantHandler.encode(
            table, block.detach(), data_type, quantized
        ).items():
            parts.setdefault(suffix, {})[rows.row] = value
    # every process, with rows here or not, builds the same entries: shapes from one row
    probe = RowWiseQuantHandler.encode(
        table, torch.zeros(1, table.embedding_dim), data_type, quantized
    )
    return {
        suffix: row_sharded_tensor(
            ranges, parts.get(suffix, {}), (table.num_embeddings, value.shape[1]), dist.group.WORLD
        )
        for suffix, value in probe.items()
    }


def _check_checkpointable(data_types: dict[str, DataType]) -> None:
    refused = {n: t.value for n, t in data_types.items() if t in NOT_CHECKPOINTABLE}
    if refused:
        raise ValueError(
            f"row-wise quantization of a sharded model to {refused} is not supported: torchrec "
            "1.8 cannot checkpoint int4/int2 rows (UInt4Tensor.is_pinned), and the sharded route "
            "re-shards through a DCP checkpoint; use bits=8 (or 16), or quantize before sharding"
        )


def sharded_rowwise_state(
    model: DistributedModelParallel,
    meta_model: nn.Module,
    config: RowWiseQuantConfig,
    calibration: Iterable[Any] | None = None,
    forward_fn: ForwardFn | None = None,
    filter_fn: FilterFn | None = None,
) -> tuple[nn.Module, dict[str, Any], CompressionReport]:
    """Row-wise quantization of a DMP model where its rows live (collective, no rows move).

    Args:
        model (DistributedModelParallel): the sharded model (left unchanged).
        meta_model (nn.Module): its unsharded architecture on ``meta`` (swapped in place).
        config (RowWiseQuantConfig): bits per table; ``factor_tables`` as unsharded.
        calibration (Optional[Iterable]): not needed (accepted, ignored).
        forward_fn (Optional[ForwardFn]): not needed (accepted, ignored).
        filter_fn (Optional[FilterFn]): selects collections of ``meta_model`` by module and fqn.

    Returns:
        tuple[nn.Module, dict[str, Any], CompressionReport]: ``meta_model`` with the quantized
        collections (TorchRec's quantized ones built on ``model.device``), its state, the report
        (rows equal to the unsharded ``compress_``'s on the same device).

    Raises:
        ValueError: naming the table: int4/int2 rows, a column-wise split table, a dimension
            the bits cannot pack.

    Example::

        >>> # every process (see tests/distributed/test_rowwise_quant_sharded.py):
        >>> # compress_(dmp, RowWiseQuantConfig(bits=8)).reshard(torch.device("cpu"))
    """
    ebcs = find_embedding_bag_collections(
        meta_model, filter_fn, lowrank_factors=config.factor_tables
    )
    table_owners(ebcs, config.table_overrides)
    handler = handler_for(config)
    assert isinstance(handler, RowWiseQuantHandler)
    planned = {fqn: handler.plan(ebc, model.device) for fqn, ebc in ebcs.items()}
    rows = [row for _, collection_rows in planned.values() for row in collection_rows]
    for data_types, _ in planned.values():
        _check_checkpointable(data_types)
    state = model.state_dict()
    new_state: dict[str, Any] = dict(state)
    for fqn, (data_types, collection_rows) in planned.items():
        if all(r.method == "kept" for r in collection_rows):
            continue
        ebc = ebcs[fqn]
        quantized = not all(t in TRAINABLE_DATA_TYPES for t in data_types.values())
        for table in ebc.embedding_bag_configs():
            prefix = f"{fqn}.embedding_bags.{table.name}."
            weight = new_state.pop(f"{prefix}weight")
            entries = _quantized_table_state(weight, table, data_types[table.name], quantized)
            new_state.update({prefix + suffix: value for suffix, value in entries.items()})
        module = empty_rowwise_collection(
            ebc.embedding_bag_configs(), ebc.is_weighted(), data_types, META, model.device
        )
        lowrank = factor_parent(meta_model, fqn)
        if lowrank is not None:
            fqn, module = fqn.rpartition(".")[0], lowrank.with_factor_collection(module)
        parent, _, child = fqn.rpartition(".")
        setattr(meta_model.get_submodule(parent), child, module)
    check_compressed_state(meta_model, new_state)
    return meta_model, new_state, CompressionReport(rows)
