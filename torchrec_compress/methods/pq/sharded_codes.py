"""Where a sharded PQ collection's codes live: the row shards of each table, the global row
space that routes every id to its owner, the groups of tables whose local code rows share one
flat buffer, and the codes' ``ShardedTensor`` state (see :mod:`.sharded`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import (
    ParameterSharding,
    ShardingType,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.distributed.state import shard_rank
from torchrec_compress.methods.pq.module import codebooks_in_state

SHARDING_TYPES: tuple[str, ...] = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
)
# Codes are a quantized, frozen table (no gradient, no optimizer state): TorchRec's "quant" kernel
# is exactly that for its estimators ("dense" is reserved to data-parallel by the planner's
# validation, and "fused" would be charged a backward pass and optimizer updates).
COMPUTE_KERNEL: str = EmbeddingComputeKernel.QUANT.value


@dataclass
class _CodeGroup:
    """Tables whose codes share dtype, ``M`` and ``dsub``: one flat buffer, one kernel call.

    Args:
        tables (List[int]): table indices (module order).
        first_feature (int): position of its first feature in the grouped feature order.
        num_features (int): its features (those of its tables, in module order).
        dtype (torch.dtype): codes dtype.
        width (int): bytes per code row.
        dim (int): ``M * dsub``.
        has_mean (bool): whether a table of the group pools by MEAN.
        flat (Tensor): ``[local rows of its tables, width]`` bytes; ``codes.<table>`` view it.
    """

    tables: list[int]
    first_feature: int
    num_features: int
    dtype: torch.dtype
    width: int
    dim: int
    has_mean: bool
    flat: Tensor


@dataclass(frozen=True)
class _TableShards:
    """Row shards of one table's codes: global offsets/sizes/ranks, and this process's share."""

    metadata: list[ShardMetadata]
    local: list[ShardMetadata]

    @property
    def local_rows(self) -> int:
        return sum(m.shard_sizes[0] for m in self.local)


def _table_shards(name: str, sharding: ParameterSharding, rank: int, width: int) -> _TableShards:
    spec = sharding.sharding_spec
    if sharding.sharding_type not in SHARDING_TYPES or not isinstance(spec, EnumerableShardingSpec):
        raise ValueError(
            f"table {name!r}: PQ codes support sharding types {', '.join(SHARDING_TYPES)} "
            f"with an enumerable sharding spec, got {sharding.sharding_type!r}"
        )
    shards = sorted(spec.shards, key=lambda m: m.shard_offsets[0])
    for m in shards:
        if m.shard_offsets[1] != 0 or m.shard_sizes[1] != width:
            raise ValueError(
                f"table {name!r}: PQ code shards must hold whole rows ({width} codes), got a "
                f"shard at {m.shard_offsets} of size {m.shard_sizes}"
            )
    local = [m for m in shards if m.placement is not None and m.placement.rank() == rank]
    return _TableShards(metadata=shards, local=local)


def bytes_per_process(owner: Tensor, item_bytes: Tensor, world_size: int) -> list[int]:
    totals = torch.zeros(world_size, dtype=torch.long, device=owner.device)
    return totals.index_add_(0, owner, item_bytes).tolist()


def all_to_all(
    values: Tensor, send_splits: list[int], recv_splits: list[int], pg: dist.ProcessGroup
) -> Tensor:
    out = values.new_empty((sum(recv_splits), *values.shape[1:]))
    dist.all_to_all_single(out, values.contiguous(), recv_splits, send_splits, group=pg)
    return out


class ShardedCodes:
    """The code storage of :class:`~torchrec_compress.methods.pq.sharded.ShardedPQEmbeddingBagCollection`
    (a mixin): routing of ids to the processes owning their rows, grouped flat code buffers, and
    the ``codes.<table>`` entries of the state dict as row-sharded ``ShardedTensor`` s."""

    codes: nn.Module
    codebooks: nn.ParameterDict
    _pg: dist.ProcessGroup
    _embedding_bag_configs: list[EmbeddingBagConfig]
    _table_names: list[str]
    _feature_names: list[list[str]]
    _pooling_is_mean: list[bool]
    _embedding_names_by_table: list[list[str]]
    _embedding_names: list[str]
    _lengths_per_embedding: list[int]
    _subspaces: dict[str, int]
    _shards: dict[str, _TableShards]

    def _codebook(self, name: str) -> Tensor:
        raise NotImplementedError

    def _build_routing(self, device: torch.device) -> None:
        """Every non-empty shard of every table as an interval of one global row space."""
        starts: list[int] = []
        ranks: list[int] = []
        table_index: list[int] = []
        local_base: list[int] = []
        table_offsets: list[int] = []
        table_rows: list[int] = []
        table_bytes: list[int] = []
        offset = 0
        for index, table in enumerate(self._embedding_bag_configs):
            shards = self._shards[table.name]
            local_codes = getattr(self.codes, table.name)
            table_offsets.append(offset)
            table_rows.append(table.num_embeddings)
            table_bytes.append(local_codes.shape[1] * local_codes.element_size())
            # a process may own several shards of a table: its local rows concatenate them
            base_of_rank: dict[int, int] = {}
            for m in shards.metadata:
                if m.shard_sizes[0] == 0 or m.placement is None:
                    continue
                rank = shard_rank(m)
                starts.append(offset + m.shard_offsets[0])
                ranks.append(rank)
                table_index.append(index)
                local_base.append(base_of_rank.get(rank, 0))
                base_of_rank[rank] = base_of_rank.get(rank, 0) + m.shard_sizes[0]
            offset += table.num_embeddings

        def as_tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        self._shard_starts = as_tensor(starts)
        self._shard_ranks = as_tensor(ranks)
        self._shard_tables = as_tensor(table_index)
        self._shard_local_base = as_tensor(local_base)
        self._table_offsets = as_tensor(table_offsets)
        self._table_rows = as_tensor(table_rows)
        self._table_bytes = as_tensor(table_bytes)

    def _build_groups(self, device: torch.device) -> list[_CodeGroup]:
        """Groups the tables by code shape; lays out the features and code rows group by group.

        Tables of one group are pooled by one kernel call over their codebooks concatenated
        along ``K`` (each table's codes shifted by the ``K`` of the tables before it), and their
        local code rows live in one flat buffer (one gather in ``compute``).
        """
        keys: dict[tuple[torch.dtype, int, int], list[int]] = {}
        for index, name in enumerate(self._table_names):
            codes: Tensor = getattr(self.codes, name)
            keys.setdefault((codes.dtype, codes.shape[1], self.codebooks[name].shape[1]), [])
            keys[(codes.dtype, codes.shape[1], self.codebooks[name].shape[1])].append(index)
        groups: list[_CodeGroup] = []
        grouped: list[int] = []  # table index of each feature, in the grouped order
        table_group, code_shift, flat_base = (
            [0] * len(self._table_names),
            [0] * len(self._table_names),
            [0] * len(self._table_names),
        )
        for (dtype, num_subspaces, dsub), tables in keys.items():
            shift, base = 0, 0
            for index in tables:
                name = self._table_names[index]
                table_group[index], code_shift[index], flat_base[index] = len(groups), shift, base
                shift += self._codebook(name).shape[1]
                base += getattr(self.codes, name).shape[0]
            features = [index for index in tables for _ in self._feature_names[index]]
            groups.append(
                _CodeGroup(
                    tables=tables,
                    first_feature=len(grouped),
                    num_features=len(features),
                    dtype=dtype,
                    width=num_subspaces * torch.empty(0, dtype=dtype).element_size(),
                    dim=num_subspaces * dsub,
                    has_mean=any(self._pooling_is_mean[i] for i in tables),
                    flat=torch.empty(0, dtype=torch.uint8),
                )
            )
            grouped += features
            self._flatten(groups[-1])
        # input features (a shared one repeated) and output keys, in the grouped order
        self._grouped_names: list[str] = [
            n for g in groups for i in g.tables for n in self._feature_names[i]
        ]
        grouped_outputs = [
            n for g in groups for i in g.tables for n in self._embedding_names_by_table[i]
        ]
        position = {name: i for i, name in enumerate(grouped_outputs)}
        self._regroup: list[int] | None = [position[n] for n in self._embedding_names]
        if self._regroup == list(range(len(self._regroup))):
            self._regroup = None
        dim_of = dict(zip(self._embedding_names, self._lengths_per_embedding, strict=True))
        self._grouped_dims: list[int] = [dim_of[n] for n in grouped_outputs]
        self._feature_tables = torch.tensor(grouped, dtype=torch.long, device=device)
        self._feature_is_mean = torch.tensor(
            [self._pooling_is_mean[i] for i in grouped], dtype=torch.bool, device=device
        )
        self._group_last_feature = torch.tensor(
            [g.first_feature + g.num_features - 1 for g in groups], dtype=torch.long, device=device
        )
        self._table_group = torch.tensor(table_group, dtype=torch.long, device=device)
        self._code_shift = torch.tensor(code_shift, dtype=torch.int32, device=device)
        self._shard_flat_base = (
            self._shard_starts.new_tensor(flat_base)[self._shard_tables] + self._shard_local_base
        )
        self._wire_width: int = max((g.width for g in groups), default=1)
        return groups

    def _flatten(self, group: _CodeGroup) -> Tensor:
        """Moves the local code rows of a group's tables into one ``[rows, width]`` buffer.

        The ``codes.<table>`` buffers become views of it, so in-place writes (loading a state
        dict, ``encode_sharded_codes_``) reach it; ``_flat_of`` rebuilds it if a buffer was
        replaced instead.
        """
        parts = []
        for index in group.tables:
            codes: Tensor = getattr(self.codes, self._table_names[index])
            parts.append(codes.contiguous().view(torch.uint8).view(codes.shape[0], group.width))
        group.flat = flat = torch.cat(parts)
        base = 0
        for index, part in zip(group.tables, parts, strict=True):
            rows = part.shape[0]
            view = flat[base : base + rows].view(group.dtype)
            self.codes.register_buffer(self._table_names[index], view)
            base += rows
        return flat

    def _flat_of(self, group: _CodeGroup) -> Tensor:
        """The group's flat code buffer, rebuilt when a ``codes.<table>`` no longer views it."""
        flat = group.flat
        base = flat.data_ptr()
        for index in group.tables:
            codes: Tensor = getattr(self.codes, self._table_names[index])
            if codes.data_ptr() != base or codes.device != flat.device:
                return self._flatten(group)
            base += codes.shape[0] * group.width
        return flat

    def _own_rows(self, table_name: str, full: Tensor) -> Tensor:
        """This process's code rows of ``table_name`` out of the full ``[rows, M]`` codes."""
        local = self._shards[table_name].local
        if not local:
            return full[:0].clone()
        return torch.cat(
            [full[m.shard_offsets[0] : m.shard_offsets[0] + m.shard_sizes[0]] for m in local]
        )

    def sharded_codes(self, table_name: str) -> ShardedTensor:
        """The codes of ``table_name`` as a ``ShardedTensor`` viewing this process's rows.

        Writing into its local shards writes the module's codes (no copy).
        """
        shards = self._shards[table_name]
        local_codes: Tensor = getattr(self.codes, table_name)
        local_shards = []
        base = 0
        for m in shards.local:
            rows = m.shard_sizes[0]
            local_shards.append(Shard(tensor=local_codes[base : base + rows], metadata=m))
            base += rows
        spec = EnumerableShardingSpec(shards.metadata)
        metadata = spec.build_metadata(
            torch.Size([self._table_rows_of(table_name), local_codes.shape[1]]),
            TensorProperties(dtype=local_codes.dtype, requires_grad=False),
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            local_shards, metadata, process_group=self._pg
        )

    def _table_rows_of(self, table_name: str) -> int:
        return self._embedding_bag_configs[self._table_names.index(table_name)].num_embeddings

    def _codes_as_sharded_tensors(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        for name in self._table_names:
            state_dict[f"{prefix}codes.{name}"] = self.sharded_codes(name)
        codebooks_in_state(self._subspaces, state_dict, prefix)

    def _codes_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: object
    ) -> None:
        for table in self._embedding_bag_configs:
            key = f"{prefix}codes.{table.name}"
            if key not in state_dict:
                continue
            value = state_dict[key]
            local: Tensor = getattr(self.codes, table.name)
            if isinstance(value, ShardedTensor):
                mine = [(m.shard_offsets, m.shard_sizes) for m in self._shards[table.name].local]
                theirs = [
                    (s.metadata.shard_offsets, s.metadata.shard_sizes)
                    for s in sorted(value.local_shards(), key=lambda s: s.metadata.shard_offsets)
                ]
                if mine != theirs:
                    raise ValueError(
                        f"{key}: local shards {theirs} do not match this module's {mine}; load "
                        "a full tensor or go through torch.distributed.checkpoint to reshard"
                    )
                rows = [
                    s.tensor
                    for s in sorted(value.local_shards(), key=lambda s: s.metadata.shard_offsets)
                ]
                value = torch.cat(rows) if rows else local[:0]
            elif tuple(value.shape) == (table.num_embeddings, local.shape[1]):
                value = self._own_rows(table.name, value)
            else:
                raise ValueError(
                    f"{key}: expected the full codes [{table.num_embeddings}, {local.shape[1]}] "
                    f"or a ShardedTensor, got shape {list(value.shape)}"
                )
            ksub = self._codebook(table.name).shape[1]
            if value.numel() > 0 and (int(value.min()) < 0 or int(value.max()) >= ksub):
                raise ValueError(
                    f"table {table.name!r}: codes must lie in [0, {ksub}) (K={ksub} codewords), "
                    f"found values in [{int(value.min())}, {int(value.max())}]"
                )
            state_dict[key] = value
