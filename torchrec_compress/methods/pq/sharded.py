"""Sharded product-quantized EmbeddingBagCollection: codes sharded by rows, codebooks replicated.

A :class:`~torchrec_compress.methods.pq.module.PQEmbeddingBagCollection` has two kinds of
state with opposite needs.  The ``[rows, M]`` codes are as large as the table is long (a billion
rows x 16 subspaces is 15 GiB) and frozen: they are sharded table-wise, row-wise or
table-row-wise like any TorchRec table, and :class:`PQEmbeddingBagCollectionSharder` shows them
to the planner through ``shardable_parameters()`` at their true shape and dtype, so the planner
sizes ``rows * M`` bytes per table.  The codebooks (``M * K * d / M`` floats) are tiny and
trained: every process holds a replica, left as ordinary dense parameters that DMP's DDP wrapper
all-reduces.

Forward, in the three ``ShardedModule`` stages (every collective is an ``all_to_all_single``,
which gloo and NCCL both provide; the input dist returns TorchRec's ``KJTListSplitsAwaitable``, so
``TrainPipelineSparseDist`` pipelines it like an EBC's):

1. ``input_dist``: every id is routed to the process that owns its code row.  Tables are laid
   end to end in one row space and the shards of all tables are intervals of it, so a single
   ``searchsorted`` over the shard starts finds the owner of every id of every table, whatever
   the sharding type (one interval for table-wise, one per process for row-wise).
2. ``compute``: each owner gathers ``M`` code bytes per id it received.  Tables whose codes
   share (dtype, ``M``, ``dsub``) form a group whose local code rows live in one flat buffer
   (the ``codes.<table>`` buffers are views of it), so the gather is one ``index_select`` per
   group, not per table.
3. ``output_dist``: the codes travel back in the order the ids were sent and every process pools
   its own batch locally with its codebook replica, exactly as the unsharded module does (SUM,
   MEAN, per-id weights, multi-hot, empty bags): one kernel call per group for all its features,
   over its tables' codebooks concatenated along ``K`` (codes shifted by the ``K`` before them).
   With one process nothing is exchanged at all.

So the traffic is one id out and ``M`` bytes back per id, instead of ``d`` floats per bag and
feature for a pooled float table, and the backward pass needs no communication besides DDP's
codebook all-reduce.  Codebook gradients are therefore DDP's: the mean over processes of each
process's local gradient, i.e. the gradient of the mean of the per-process losses.

:func:`encode_sharded_codes_` fills the codes of a sharded table from a sharded *float* table
(e.g. the ``ShardedTensor`` weight of a DMP-sharded ``EmbeddingBagCollection``): each process
encodes only the rows it holds, chunk by chunk, and the codes (``M`` bytes per row) move to the
processes that own them.  The float table is never gathered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    LazyNoWait,
    ModuleSharder,
    NoWait,
    ParameterSharding,
    ShardedModule,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from torchrec_compress.distributed.in_backward import (
    InBackwardFusedOptimizer,
    copy_in_backward_optimizers,
    in_backward_group,
    step_in_backward,
)
from torchrec_compress.methods.pq.module import (
    PQEmbeddingBagCollection,
    codebook_rows_in_state,
    codebook_view,
    pq_feature_lookup,
)
from torchrec_compress.methods.pq.sharded_codes import (
    COMPUTE_KERNEL,
    SHARDING_TYPES,
    ShardedCodes,
    _CodeGroup,
    _table_shards,
    _TableShards,
    all_to_all,
)


@dataclass
class PQShardingContext(Multistreamable):
    """What the requesting side of one forward remembers between the stages.

    Args:
        input (Optional[KeyedJaggedTensor]): the local batch as it came in.
        features (Dict[str, JaggedTensor]): the local batch, per feature (what is pooled).
        order (Tensor): permutation sorting the local ids by owning process.
        send_splits (List[int]): ids sent to each process.
        recv_splits (List[int]): ids received from each process.
        table_of_id (Tensor): table index of every local id (in the order of ``ordered``).
        ordered (Optional[KeyedJaggedTensor]): the local batch, the module's features only,
            grouped by code shape (what is pooled: one kernel call per group).
        group_ends (List[int]): end of each group's ids in ``ordered`` (several groups only).
    """

    input: KeyedJaggedTensor | None = None
    features: dict[str, Any] = field(default_factory=dict)
    ordered: KeyedJaggedTensor | None = None
    order: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    table_of_id: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    group_ends: list[int] = field(default_factory=list)

    def record_stream(self, stream: torch.Stream) -> None:
        """Marks its tensors as used on ``stream`` (``TrainPipelineSparseDist`` on CUDA)."""
        if self.input is not None:
            self.input.record_stream(stream)  # the features are views of it
        if self.ordered is not None:
            self.ordered.record_stream(stream)
        for tensor in (self.order, self.table_of_id):
            tensor.record_stream(stream)


class ShardedPQEmbeddingBagCollection(
    ShardedCodes,
    ShardedModule[KJTList, Tensor, KeyedTensor, PQShardingContext],
    FusedOptimizerModule,
):
    """``PQEmbeddingBagCollection`` with row-sharded codes and replicated codebooks.

    Built by :class:`PQEmbeddingBagCollectionSharder` (through ``DistributedModelParallel``).
    Its output equals the unsharded module's on the same local batch.  ``state_dict()`` has the
    unsharded keys: ``codes.<table>`` as a ``ShardedTensor`` (whose local shards are views of
    this process's code rows, so ``torch.distributed.checkpoint`` saves and reshards them) and
    ``codebooks.<table>`` as plain tensors.  ``load_state_dict`` accepts ``codes.<table>`` either
    as a ``ShardedTensor`` of the same layout or as the full ``[rows, M]`` tensor, of which each
    process copies its own rows.  When the source module is not on ``meta``, its codes and
    codebooks are copied in at construction.

    Args:
        module (PQEmbeddingBagCollection): the unsharded module (any device, ``meta`` included).
        table_shardings (Dict[str, ParameterSharding]): the plan of every table's codes.
        env (ShardingEnv): process group, rank and world size.
        device (torch.device): where the local codes and the codebook replicas live.

    Example::

        >>> # 2 processes, see tests/distributed/test_pq_sharded.py
        >>> # dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
        >>> #                                sharders=[PQEmbeddingBagCollectionSharder()])
    """

    def __init__(
        self,
        module: PQEmbeddingBagCollection,
        table_shardings: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> None:
        super().__init__()
        if env.process_group is None:
            raise ValueError("ShardedPQEmbeddingBagCollection needs a process group")
        self._pg: dist.ProcessGroup = env.process_group
        self._rank: int = env.rank
        self._world_size: int = env.world_size
        self._is_weighted: bool = module.is_weighted()
        self._embedding_bag_configs: list[EmbeddingBagConfig] = module.embedding_bag_configs()
        tables = self._embedding_bag_configs
        missing = [t.name for t in tables if t.name not in table_shardings]
        if missing:
            raise ValueError(f"the sharding plan has no entry for tables {missing}")
        self._table_names: list[str] = [t.name for t in tables]
        self._feature_names: list[list[str]] = [list(t.feature_names) for t in tables]
        self._pooling_is_mean: list[bool] = [t.pooling == PoolingType.MEAN for t in tables]
        # output keys as TorchRec names them: "feature@table" for a feature read by several tables
        self._embedding_names_by_table: list[list[str]] = get_embedding_names_by_table(tables)
        self._embedding_names: list[str] = [
            n for names in self._embedding_names_by_table for n in names
        ]
        self._lengths_per_embedding: list[int] = [
            t.embedding_dim for t in tables for _ in t.feature_names
        ]
        self._table_shardings: dict[str, ParameterSharding] = dict(table_shardings)

        self.codes = nn.Module()
        self.codebooks = nn.ParameterDict()  # [M * K, dsub] per table, as in the module
        self._subspaces: dict[str, int] = dict(module._subspaces)
        self._shards: dict[str, _TableShards] = {}
        for table in tables:
            source_codes: Tensor = getattr(module.codes, table.name)
            source_books = module.codebooks[table.name]
            shards = _table_shards(
                table.name,
                self._table_shardings[table.name],
                self._rank,
                source_codes.shape[1],
            )
            self._shards[table.name] = shards
            if source_codes.device.type == "meta":
                local = torch.zeros(
                    shards.local_rows, source_codes.shape[1], dtype=source_codes.dtype
                )
                books = torch.zeros(source_books.shape)
            else:
                local = self._own_rows(table.name, source_codes)
                books = source_books.detach().clone()
            self.codes.register_buffer(table.name, local.to(device).contiguous())
            self.codebooks[table.name] = nn.Parameter(books.to(device))
        self._fused_codebooks: list[str] = self._attach_in_backward_optimizers(module)
        self._fused_optimizer = InBackwardFusedOptimizer(
            {f"codebooks.{name}": books for name, books in self.codebooks.items()}
        )
        self._build_routing(device)
        self._permutations: dict[tuple[str, ...], list[int]] = {}
        self._groups: list[_CodeGroup] = self._build_groups(device)
        self._register_state_dict_hook(self._codes_as_sharded_tensors)
        self._register_load_state_dict_pre_hook(self._codes_from_state_dict, with_module=False)
        self._register_load_state_dict_pre_hook(
            partial(codebook_rows_in_state, self._subspaces), with_module=False
        )

    def _attach_in_backward_optimizers(self, module: PQEmbeddingBagCollection) -> list[str]:
        """Re-attaches the source codebooks' in-backward optimizers; returns those tables."""
        tables = [
            t for t in self._table_names if hasattr(module.codebooks[t], "_optimizer_classes")
        ]
        pg = in_backward_group(self._pg, bool(tables))
        for name in tables:
            copy_in_backward_optimizers(module.codebooks[name], self.codebooks[name])
            step_in_backward(self.codebooks[name], pg)
        return tables

    def _in_grouped_order(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` restricted to the module's features, in the grouped order."""
        keys = features.keys()
        if keys == self._grouped_names:
            return features
        weights = features.weights_or_none()
        if weights is not None and weights.requires_grad:
            # fbgemm's permute_2D_sparse_data backward crashes on a subset of keys: concatenate
            return self._grouped_kjt(features.to_dict())
        indices = self._permutations.get(tuple(keys))
        if indices is None:
            position = {name: i for i, name in enumerate(keys)}
            missing = [name for name in self._grouped_names if name not in position]
            if missing:
                raise KeyError(
                    f"features {missing} of the PQ tables are missing from the input; it has {keys}"
                )
            indices = [position[name] for name in self._grouped_names]
            self._permutations[tuple(keys)] = indices
        return features.permute(indices)

    def _grouped_kjt(self, features: Mapping[str, Any]) -> KeyedJaggedTensor:
        """A KJT of per-feature ``JaggedTensor`` s (processed bags), in the grouped order."""
        missing = [name for name in self._grouped_names if name not in features]
        if missing:
            raise KeyError(f"features {missing} of the PQ tables are missing; got {list(features)}")
        jts = [features[name] for name in self._grouped_names]
        return KeyedJaggedTensor(
            keys=self._grouped_names,
            values=torch.cat([jt.values() for jt in jts]),
            weights=torch.cat([jt.weights() for jt in jts]) if self._is_weighted else None,
            lengths=torch.cat([jt.lengths() for jt in jts]),
        )

    def create_context(self) -> PQShardingContext:
        return PQShardingContext()

    def input_dist(
        self, ctx: PQShardingContext, features: KeyedJaggedTensor
    ) -> KJTListSplitsAwaitable[PQShardingContext]:
        """Sends every id to the process owning its code row; returns the ids received.

        The ids travel as keys of the global row space (table offset + id), so an owner finds
        the table and local row of each with the same ``searchsorted``.  With one process
        nothing travels and the ids keep their order (``ctx.order`` stays empty).
        """
        if features.variable_stride_per_key():
            raise ValueError("variable batch size per feature is not supported by PQ sharding")
        ordered = self._in_grouped_order(features)
        ctx.input, ctx.ordered, ctx.features = features, ordered, {}
        all_ids = ordered.values().long()
        feature_lengths = ordered.lengths().view(len(self._grouped_names), -1).sum(1)
        table_of_id = torch.repeat_interleave(
            self._feature_tables, feature_lengths, output_size=all_ids.numel()
        )
        ctx.table_of_id = table_of_id
        if len(self._groups) > 1:
            ctx.group_ends = feature_lengths.cumsum(0)[self._group_last_feature].tolist()
        self._check_ids(all_ids, table_of_id)
        keys = all_ids + self._table_offsets[table_of_id]
        if self._world_size == 1:
            ctx.send_splits = ctx.recv_splits = [keys.numel()]
            return KJTListSplitsAwaitable([NoWait(NoWait(keys))], ctx)
        owner = self._shard_ranks[torch.searchsorted(self._shard_starts, keys, right=True) - 1]
        ctx.order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self._world_size)
        recv_counts = all_to_all(
            send_counts, [1] * self._world_size, [1] * self._world_size, self._pg
        )
        ctx.send_splits = send_counts.tolist()
        ctx.recv_splits = recv_counts.tolist()
        received = all_to_all(keys[ctx.order], ctx.send_splits, ctx.recv_splits, self._pg)
        # TorchRec's shape of an input dist (what TrainPipelineSparseDist fuses and waits on):
        # one awaitable per sharding, each giving an awaitable of the redistributed input.
        return KJTListSplitsAwaitable([NoWait(NoWait(received))], ctx)

    def _check_ids(self, all_ids: Tensor, table_of_id: Tensor) -> None:
        """Raises naming the table and the id when an id is outside its table's rows."""
        out_of_range = (all_ids < 0) | (all_ids >= self._table_rows[table_of_id])
        if bool(out_of_range.any()):
            bad = int(out_of_range.nonzero()[0, 0])
            table = self._embedding_bag_configs[int(table_of_id[bad])]
            raise IndexError(
                f"table {table.name!r} (features {table.feature_names}): id {int(all_ids[bad])} "
                f"is out of range [0, {table.num_embeddings})"
            )

    def compute(self, ctx: PQShardingContext, dist_input: KJTList) -> Tensor:
        """Gathers the code bytes of every received id: ``[n, wire width]`` ``uint8`` rows.

        One gather per group of tables with the same code shape; rows narrower than the widest
        group are padded with zeros on the wire only.
        """
        received: Tensor = dist_input[0]
        shard = torch.searchsorted(self._shard_starts, received, right=True) - 1
        rows = received - self._shard_starts[shard] + self._shard_flat_base[shard]
        if len(self._groups) == 1:
            return self._gather(self._groups[0], rows)
        group_of_id = self._table_group[self._shard_tables[shard]]
        out = torch.zeros(
            received.numel(), self._wire_width, dtype=torch.uint8, device=received.device
        )
        for index, group in enumerate(self._groups):
            selected = (group_of_id == index).nonzero().squeeze(1)
            out[:, : group.width].index_copy_(0, selected, self._gather(group, rows[selected]))
        return out

    def _gather(self, group: _CodeGroup, rows: Tensor) -> Tensor:
        """``[len(rows), width]`` code bytes of a group (whole rows as 8-byte words if possible)."""
        flat = self._flat_of(group)
        if group.width % 8 == 0:
            return flat.view(torch.int64).index_select(0, rows).view(torch.uint8)
        return flat.index_select(0, rows)

    def output_dist(self, ctx: PQShardingContext, output: Tensor) -> LazyAwaitable[KeyedTensor]:
        """Returns the code bytes to the requesters, then pools every local bag."""
        if self._world_size == 1:
            return LazyNoWait(self._pool(ctx, output))
        returned = all_to_all(output, ctx.recv_splits, ctx.send_splits, self._pg)
        codes = torch.empty_like(returned)
        codes[ctx.order] = returned
        return LazyNoWait(self._pool(ctx, codes))

    def process_local_features(
        self, ctx: PQShardingContext, processors: nn.Module, is_collection: bool
    ) -> None:
        """Applies an enclosing FPEBC's feature processors to the local batch before pooling.

        Args:
            ctx (PQShardingContext): this forward's context (``input_dist`` recorded the batch).
            processors (nn.Module): a ``FeatureProcessorsCollection``, or a ``ModuleDict`` of
                per-feature processors.
            is_collection (bool): which of the two ``processors`` is.
        """
        assert ctx.input is not None, "input_dist records the local batch"
        if is_collection:
            ctx.ordered = self._in_grouped_order(processors(ctx.input))
            return
        assert isinstance(processors, nn.ModuleDict)
        assert ctx.ordered is not None
        ctx.features = {
            name: processors[name](feature) if name in processors else feature
            for name, feature in ctx.ordered.to_dict().items()
        }

    def _pool(self, ctx: PQShardingContext, code_rows: Tensor) -> KeyedTensor:
        """Pools the local bags: one kernel call per group of tables, all its features at once.

        Table ``t``'s codes are shifted by the ``K`` of the group's tables before it, into the
        ``[M, sum K, dsub]`` concatenated codebooks, and the group's bags are pooled at once in
        batch-major order (bag ``(b, f)`` is row ``b * F_g + f``), so the kernel writes the
        ``[B, F_g * d]`` output directly and reads its gradient without a transposed copy.
        """
        kjt = self._grouped_kjt(ctx.features) if ctx.features else ctx.ordered
        assert kjt is not None, "input_dist records the local batch"
        batch, offsets, lengths = kjt.stride(), kjt.offsets(), kjt.lengths()
        weights = kjt.weights() if self._is_weighted else None
        pooled: list[Tensor] = []
        first = 0
        for index, group in enumerate(self._groups):
            last = ctx.group_ends[index] if len(self._groups) > 1 else code_rows.shape[0]
            codes = code_rows[first:last, : group.width].view(group.dtype).to(torch.int32)
            codes += self._code_shift[ctx.table_of_id[first:last]].unsqueeze(1)
            books = [self._codebook(self._table_names[t]) for t in group.tables]
            bags = slice(
                group.first_feature * batch, (group.first_feature + group.num_features) * batch
            )
            ids, bag_offsets, bag_lengths = _batch_major(
                offsets[bags] - first, lengths[bags], group.num_features, last - first
            )
            values = pq_feature_lookup(
                codes,
                _CatCodebooks.apply(*books) if len(books) > 1 else books[0],
                ids,
                bag_offsets,
                weights[first:last][ids] if weights is not None else None,
                False,
            )
            if group.has_mean:
                features = slice(group.first_feature, group.first_feature + group.num_features)
                scale = torch.where(
                    self._feature_is_mean[features].unsqueeze(0),
                    bag_lengths.view(batch, -1).clamp(min=1).to(values.dtype),
                    1.0,
                )
                values = values / scale.view(-1, 1)
            pooled.append(values.view(batch, group.num_features * group.dim))
            first = last
        return KeyedTensor(
            keys=self._embedding_names,
            values=self._in_module_columns(pooled),
            length_per_key=self._lengths_per_embedding,
        )

    def _in_module_columns(self, pooled: list[Tensor]) -> Tensor:
        """The groups' ``[B, F_g * d_g]`` outputs as ``[B, sum d]`` in module feature order."""
        values = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        if self._regroup is None:
            return values
        chunks = values.split(self._grouped_dims, dim=1)
        return torch.cat([chunks[i] for i in self._regroup], dim=1)

    def _codebook(self, name: str) -> Tensor:
        """Table ``name``'s codebooks as ``[M, K, dsub]`` (a view of its parameter)."""
        return codebook_view(self.codebooks[name], self._subspaces[name])

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The in-backward optimizers of the codebooks (empty when none was attached)."""
        return self._fused_optimizer

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """What DMP's DDP wrapper must skip: the codes, and the codebooks that are updated in
        backward (they all-reduce their own gradients); DDP all-reduces the other codebooks."""
        for name in self._table_names:
            yield append_prefix(prefix, f"codes.{name}")
        for name in self._fused_codebooks:
            yield append_prefix(prefix, f"codebooks.{name}")

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original table configs."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        """Whether features carry per-id weights."""
        return self._is_weighted

    @property
    def unsharded_module_type(self) -> type[PQEmbeddingBagCollection]:
        return PQEmbeddingBagCollection


class _CatCodebooks(torch.autograd.Function):
    """``torch.cat(codebooks, dim=1)`` whose backward gives each codebook a contiguous gradient.

    (Plain ``cat`` hands back strided slices, which DDP's gradient buckets warn about and copy.)
    """

    @staticmethod
    def forward(ctx: Any, *books: Tensor) -> Tensor:
        ctx.sizes = [b.shape[1] for b in books]
        return torch.cat(books, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        # a fresh tensor with default strides (a size-1 M keeps its parent's stride in a view)
        return tuple(
            g.clone(memory_format=torch.contiguous_format) for g in grad.split(ctx.sizes, dim=1)
        )


def _batch_major(
    starts: Tensor, lengths: Tensor, num_features: int, num_ids: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Id positions, offsets and lengths of feature-major bags (``[F, B]``) in batch-major order.

    Args:
        starts (Tensor): ``[F * B]`` first id position of each bag (feature-major).
        lengths (Tensor): ``[F * B]`` ids per bag (feature-major).
        num_features (int): ``F``.
        num_ids (int): total ids.
    """
    bm_starts = starts.view(num_features, -1).t().reshape(-1)
    bm_lengths = lengths.view(num_features, -1).t().reshape(-1).long()
    bm_offsets = torch.zeros(bm_lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(bm_lengths, 0, out=bm_offsets[1:])
    shift = torch.repeat_interleave(bm_starts - bm_offsets[:-1], bm_lengths, output_size=num_ids)
    ids = shift + torch.arange(num_ids, device=lengths.device)
    return ids, bm_offsets, bm_lengths


class PQEmbeddingBagCollectionSharder(ModuleSharder[PQEmbeddingBagCollection]):
    """Shards the codes of a ``PQEmbeddingBagCollection``; replicates its codebooks.

    The planner sees one ``[num_embeddings, M]`` tensor per table, of the codes' own dtype
    (``uint8`` for ``K <= 256``), so its storage estimate is ``rows * M`` bytes per table.
    Table-wise, row-wise and table-row-wise are offered on every device (the exchange is plain
    ``all_to_all_single``, which gloo provides); the compute kernel is ``"quant"``.

    Example::

        >>> import torch
        >>> from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=10**9,
        ...                            feature_names=["f"])
        >>> meta = torch.device("meta")
        >>> pq = PQEmbeddingBagCollection(
        ...     [table],
        ...     {"t": torch.empty(10**9, 16, dtype=torch.uint8, device=meta)},
        ...     {"t": torch.empty(16, 256, 8, device=meta)})
        >>> planner = EmbeddingShardingPlanner(Topology(world_size=8, compute_device="cuda"))
        >>> plan = planner.plan(pq, [PQEmbeddingBagCollectionSharder()])
        >>> plan.plan[""]["t"].compute_kernel
        'quant'
    """

    def shard(
        self,
        module: PQEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedPQEmbeddingBagCollection:
        return ShardedPQEmbeddingBagCollection(
            module, params, env, device if device is not None else torch.device("cpu")
        )

    def shardable_parameters(self, module: PQEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        # The codes are buffers; a frozen Parameter view shows the planner their shape and dtype.
        return {
            table.name: nn.Parameter(getattr(module.codes, table.name), requires_grad=False)
            for table in module.embedding_bag_configs()
        }

    @property
    def module_type(self) -> type[PQEmbeddingBagCollection]:
        return PQEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [COMPUTE_KERNEL]
