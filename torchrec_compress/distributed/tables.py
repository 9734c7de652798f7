"""Sharded tables as the sharded drivers of every method see them: where each block of a table's
rows lives, lookups counted on each process and merged, a row-sharded ``ShardedTensor`` of new
rows, and the compressed state saved as a DCP checkpoint.

A DMP model's table weight is a ``ShardedTensor`` of blocks (rows x columns, one per shard);
:func:`row_ranges` groups them into ranges of whole rows (several column blocks each, the first
one's process leading), which is the unit every method compresses where it lives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.feature_processor_ import FeatureProcessorsCollection
from torchrec.modules.fp_embedding_modules import apply_feature_processors_to_kjt
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import checkpoint
from torchrec_compress.calibration import ForwardFn, calibration_pass
from torchrec_compress.distributed.state import shard_rank

# the key of a compressed checkpoint's layout (JSON), next to "model"
COMPRESSION_LAYOUT_KEY = "compression_layout"


@dataclass(frozen=True)
class Block:
    """One shard of a table: rows ``[row, row + rows)``, columns ``[col, col + cols)``."""

    row: int
    rows: int
    col: int
    cols: int
    rank: int


@dataclass
class RowRange:
    """The shards covering the same rows; ``blocks`` sorted by column, the first one leads."""

    row: int
    rows: int
    blocks: list[Block]

    @property
    def lead(self) -> int:
        """The process that assembles statistics and holds the factor rows of this range."""
        return self.blocks[0].rank

    @property
    def ranks(self) -> set[int]:
        return {b.rank for b in self.blocks}


def row_ranges(value: torch.Tensor, name: str, dim: int) -> list[RowRange]:
    """Global layout of one table's weight in a DMP state dict (same on every process).

    A plain tensor (data-parallel table) is replicated: rank 0 leads it as one block.
    """
    if isinstance(value, ShardedTensor):
        blocks = [
            Block(
                m.shard_offsets[0],
                m.shard_sizes[0],
                m.shard_offsets[1],
                m.shard_sizes[1],
                shard_rank(m),
            )
            for m in value.metadata().shards_metadata
        ]
    elif isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        blocks = [Block(0, value.shape[0], 0, value.shape[1], 0)]
    else:
        raise TypeError(f"table {name!r}: unsupported sharded weight type {type(value).__name__}")
    by_rows: dict[tuple[int, int], list[Block]] = {}
    for block in blocks:
        by_rows.setdefault((block.row, block.rows), []).append(block)
    ranges = []
    for (row, rows), group in sorted(by_rows.items()):
        group.sort(key=lambda b: b.col)
        if sum(b.cols for b in group) != dim or group[0].col != 0:
            raise ValueError(
                f"table {name!r}: shards of rows {row}..{row + rows} do not tile {dim} columns"
            )
        ranges.append(RowRange(row, rows, group))
    return ranges


def local_blocks(value: torch.Tensor, rank: int) -> dict[tuple[int, int], torch.Tensor]:
    """``(row, col)`` offset -> this process's shard tensor of one table."""
    if isinstance(value, ShardedTensor):
        return {
            (s.metadata.shard_offsets[0], s.metadata.shard_offsets[1]): s.tensor
            for s in value.local_shards()
        }
    return {(0, 0): value} if rank == 0 else {}


def gather_rows(
    value: torch.Tensor,
    ids: torch.Tensor,
    name: str,
    dim: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Rows ``ids`` (any order, repeats allowed) of one table's weight in a DMP state dict, as
    float32 on every process (collective: every process passes the same ``ids``).  Only the
    requested rows travel, each column block from the process holding it; any sharding.

    Example::

        >>> # 2 processes: see tests/distributed/test_budget_dmp.py
        >>> # rows = gather_rows(dmp.state_dict()[key], torch.tensor([7, 3, 7]), "t", 16)
    """
    unique, inverse = torch.unique(ids.long(), return_inverse=True)
    layout = row_ranges(value, name, dim)
    total = sum(r.rows for r in layout)
    if unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) >= total):
        bad = int(unique[0]) if int(unique[0]) < 0 else int(unique[-1])
        raise ValueError(f"table {name!r}: row id {bad} is outside [0, {total})")  # every process
    me = dist.get_rank(group)
    local = local_blocks(value, me)
    parts: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for rows in layout:
        at = ((unique >= rows.row) & (unique < rows.row + rows.rows)).nonzero().squeeze(1)
        for block in rows.blocks:
            if at.numel() and block.rank == me:
                shard = local[(rows.row, block.col)]
                parts.append((at, block.col, shard[unique[at] - rows.row].detach().float().cpu()))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, parts, group=group)
    out = torch.zeros(unique.numel(), dim)
    for at, col, part in (p for per_rank in gathered for p in per_rank):
        out[at, col : col + part.shape[1]] = part
    return out[inverse]


class SparseLookupCounter:
    """Lookup counts of one EBC's tables as sorted ``(ids, counts)`` pairs, not dense N-vectors.

    Memory grows with the number of distinct ids the data touches, never with the table size,
    so a billion-row table costs what its calibration data costs.  Same counting rule as
    :class:`~torchrec_compress.statistics.LookupCounter` (1 per id, or its weight when
    ``is_weighted``; a feature read by several tables counts for each).

    Args:
        tables (Sequence[EmbeddingBagConfig]): the collection's table configs.
        is_weighted (bool): count per-id weights instead of 1.

    Example::

        >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10**9,
        ...                          feature_names=["f"])
        >>> counter = SparseLookupCounter([cfg])
        >>> counter.update(KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([7, 5, 7]), lengths=torch.tensor([2, 1])))
        >>> ids, counts = counter.counts()["t"]
        >>> ids.tolist(), counts.tolist()
        ([5, 7], [1.0, 2.0])
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], is_weighted: bool = False) -> None:
        self._tables = list(tables)
        self._is_weighted = is_weighted
        self._ids = {t.name: torch.zeros(0, dtype=torch.int64) for t in tables}
        self._counts = {t.name: torch.zeros(0, dtype=torch.float64) for t in tables}

    def update(self, features: KeyedJaggedTensor) -> None:
        """Adds the lookups of one batch; raises ``ValueError`` on ids outside their table."""
        jagged = features.to_dict()
        for table in self._tables:
            parts = [jagged[f] for f in table.feature_names or [table.name] if f in jagged]
            if not parts:
                continue
            ids = torch.cat([p.values().to(torch.int64) for p in parts])
            bad = (ids < 0) | (ids >= table.num_embeddings)
            if bad.any():
                raise ValueError(
                    f"table {table.name!r} got id {int(ids[bad][0])} "
                    f"(valid ids: 0..{table.num_embeddings - 1})"
                )
            weights = [p.weights_or_none() if self._is_weighted else None for p in parts]
            counts = torch.cat(
                [
                    torch.ones(p.values().numel(), dtype=torch.float64)
                    if w is None
                    else w.to(torch.float64)
                    for p, w in zip(parts, weights, strict=True)
                ]
            )
            self._ids[table.name], self._counts[table.name] = merge_counts(
                torch.cat([self._ids[table.name], ids.cpu()]),
                torch.cat([self._counts[table.name], counts.cpu()]),
            )

    def counts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Table name -> (sorted distinct ids, their float64 counts)."""
        return {t.name: (self._ids[t.name], self._counts[t.name]) for t in self._tables}


def merge_counts(ids: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums the counts of equal ids; returns sorted distinct ids and their counts."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return unique, torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, counts)


def all_gather_counts(
    local: list[tuple[torch.Tensor, torch.Tensor]], group: dist.ProcessGroup | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global ``(ids, counts)`` per table from every process's pairs (3 all-gathers in all).

    Only the ids the data touched travel (never an N-length vector); every process then keeps
    what its own shards need.
    """
    table_index = torch.cat(
        [torch.full((ids.numel(),), i, dtype=torch.int64) for i, (ids, _) in enumerate(local)]
        or [torch.zeros(0, dtype=torch.int64)]
    )
    ids = torch.cat([ids for ids, _ in local] or [torch.zeros(0, dtype=torch.int64)])
    counts = torch.cat([c for _, c in local] or [torch.zeros(0, dtype=torch.float64)])
    world = dist.get_world_size(group)
    size = torch.tensor([ids.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    pairs = torch.stack([table_index, ids])
    padded_pairs = torch.full((2, longest), -1, dtype=torch.int64)
    padded_pairs[:, : ids.numel()] = pairs
    padded_counts = torch.zeros(longest, dtype=torch.float64)
    padded_counts[: ids.numel()] = counts
    all_pairs = [torch.empty_like(padded_pairs) for _ in range(world)]
    all_counts = [torch.empty_like(padded_counts) for _ in range(world)]
    dist.all_gather(all_pairs, padded_pairs, group=group)
    dist.all_gather(all_counts, padded_counts, group=group)
    valid = [slice(0, int(s.item())) for s in sizes]
    gathered_pairs = torch.cat([p[:, v] for p, v in zip(all_pairs, valid, strict=True)], dim=1)
    gathered_counts = torch.cat([c[v] for c, v in zip(all_counts, valid, strict=True)])
    out = []
    for i in range(len(local)):
        mine = gathered_pairs[0] == i
        out.append(merge_counts(gathered_pairs[1, mine], gathered_counts[mine]))
    return out


def dense_counts(ids: torch.Tensor, counts: torch.Tensor, row: int, rows: int) -> torch.Tensor:
    """Counts of rows ``[row, row + rows)`` as a dense ``(rows,)`` float64 tensor."""
    inside = (ids >= row) & (ids < row + rows)
    dense = torch.zeros(rows, dtype=torch.float64)
    dense[ids[inside] - row] = counts[inside]
    return dense


def sum_identical_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """All-reduce (sum) in place, then broadcast rank 0's result, so that every process
    factorises bit-identical statistics whatever the reduction order."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, group=group)
    dist.broadcast(flat, src=0, group=group)
    for tensor, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))


def row_sharded_tensor(
    ranges: list[RowRange],
    factors: Mapping[int, torch.Tensor],
    shape: tuple[int, int],
    group: dist.ProcessGroup | None,
) -> ShardedTensor:
    """The factor table as a row-sharded ``ShardedTensor``: each range on its lead (collective)."""
    shards = [
        Shard.from_tensor_and_offsets(factors[r.row], [r.row, 0], dist.get_rank())
        for r in ranges
        if r.row in factors
    ]
    return ShardedTensor._init_from_local_shards(shards, *shape, process_group=group)


class ProcessedLookupCounter:
    """Counts the lookups of a collection inside a sharded feature-processed collection.

    The sharded FPEBC drives its collection's input dist itself (the collection's forward never
    runs), and its processors run after the ids are distributed; the unsharded collection is
    called with the processed batch (e.g. position weights), which is what AFM's statistics
    weigh.  So the FPEBC's forward is hooked and the processors are applied to its local batch
    here, from the bags' own positions (TorchRec's position-weighted processors remember
    whether an input was pre-processed for row-wise sharding: that state is set aside).
    """

    def __init__(self, fp_module: nn.Module, counter: SparseLookupCounter) -> None:
        self._processors: nn.Module = fp_module._feature_processors  # type: ignore[assignment]
        self._counter = counter

    def update(self, features: KeyedJaggedTensor) -> None:
        stateful = [m for m in self._processors.modules() if hasattr(m, "_pre_processed")]
        flags = [m._pre_processed for m in stateful]
        try:
            for m in stateful:
                setattr(m, "_pre_processed", False)  # noqa: B010 - a plain attribute of theirs
            if isinstance(self._processors, FeatureProcessorsCollection):
                processed = self._processors(features)
            else:
                processed = apply_feature_processors_to_kjt(features, self._processors)
        finally:
            for m, flag in zip(stateful, flags, strict=True):
                setattr(m, "_pre_processed", flag)  # noqa: B010
        self._counter.update(processed)


def lookup_counting_modules(
    model: nn.Module, counters: Mapping[str, SparseLookupCounter]
) -> dict[nn.Module, Any]:
    """The module of ``model`` whose forward sees the local batch of each collection in
    ``counters`` (by fqn), and what counts it: the collection itself, or the sharded
    feature-processed collection around it (see :class:`ProcessedLookupCounter`)."""
    out: dict[nn.Module, Any] = {}
    for fqn, counter in counters.items():
        parent_fqn, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_fqn)
        if name == "_embedding_bag_collection" and isinstance(parent, ShardedModule):
            out[parent] = ProcessedLookupCounter(parent, counter)
        else:
            out[model.get_submodule(fqn)] = counter
    return out


def global_lookup_pairs(
    model: nn.Module,
    ebcs: Mapping[str, EmbeddingBagCollection],
    tables: Sequence[tuple[str, EmbeddingBagConfig]],
    batches: Iterable[Any],
    forward_fn: ForwardFn,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Table name -> global sorted ``(ids, counts)`` of this process group's ``batches``: one
    calibration pass over ``model`` (a DMP model; ``ebcs`` its unsharded collections by fqn,
    ``tables`` their ``(fqn, config)`` pairs), sparse pairs summed over the group (collective)."""
    inner = getattr(model, "module", model)
    counters = {
        fqn: SparseLookupCounter(ebc.embedding_bag_configs(), ebc.is_weighted())
        for fqn, ebc in ebcs.items()
    }
    calibration_pass(model, batches, forward_fn, lookup_counting_modules(inner, counters), {})
    local = [counters[fqn].counts()[t.name] for fqn, t in tables]
    gathered = all_gather_counts(local, dist.group.WORLD)
    return {t.name: pairs for (_, t), pairs in zip(tables, gathered, strict=True)}


def check_compressed_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Raises ``RuntimeError`` naming the keys by which ``state`` and ``module``'s differ."""
    expected = set(module.state_dict())
    if expected != set(state):
        raise RuntimeError(
            "compressed state does not match the compressed module: missing "
            f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )


def save_compressed_state(
    state: Mapping[str, Any], checkpoint_dir: str, layout: Mapping[str, Any] | None = None
) -> None:
    """Collective, atomic and verified DCP save of ``{"model": state}`` (the layout of
    ``examples/dlrm/train.py``'s checkpoints, see :func:`torchrec_compress.checkpoint.save`),
    replacing whatever was at ``checkpoint_dir``.

    ``layout`` (a ``CompressionLayout.to_dict()``) is stored in it as JSON under the key
    ``"compression_layout"``, so that ``load_compressed`` can rebuild the compressed modules.
    """
    entries: dict[str, Any] = {"model": dict(state)}
    if layout is not None:
        entries[COMPRESSION_LAYOUT_KEY] = json.dumps(layout)
    checkpoint.save(entries, checkpoint_dir, keep=0)
