"""Sharded low-rank EmbeddingBagCollection: factor tables sharded by TorchRec, projection dense.

A :class:`~torchrec_compress.methods.lowrank.module.LowRankEmbeddingBagCollection` is
sharded as one module, in the pattern of TorchRec's ``fp_embeddingbag.py`` and
``mc_embeddingbag.py``: :class:`ShardedLowRankEmbeddingBagCollection` builds the sharded EBC of
its k-dim factor tables with an EBC sharder (any sharding type and kernel the EBC sharder offers;
by default the project's row-wise-on-CPU sharder) and delegates ``input_dist`` / ``compute`` /
``output_dist`` to it, so the all-to-alls carry k instead of d floats per bag.  The output is
finished by the projection: ``[pooled A | coef] @ [B; mu]`` per table, where ``coef`` is the
exact pooling coefficient of the mean (sum of weights, or that over the bag length for MEAN),
computed from the local batch at ``input_dist`` time and kept in the context.

To the planner and to ``TrainPipelineSparseDist`` this is one sharded module with one input dist;
:class:`LowRankEmbeddingBagCollectionSharder` shows the planner the factor tables (rows x k) and
the projection and mean stay dense (replicated; DMP's DDP wrapper all-reduces their gradients).
``state_dict()`` keys are those of the unsharded module: ``factor_ebc.embedding_bags.<t>.weight``
(``ShardedTensor``), ``projection.<t>`` and ``mean.<t>``.

A low-rank collection inside TorchRec's ``FeatureProcessedEmbeddingBagCollection`` (e.g.
position-weighted features) is sharded by :class:`FeatureProcessedLowRankSharder`: the mean's
coefficients need the processed weights of the local batch, so the feature processors (dense
replicas) are applied to it locally as well as, by TorchRec, to the distributed ids.
"""

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder,
)
from torchrec.distributed.fp_embeddingbag import (
    FeatureProcessedEmbeddingBagCollectionSharder,
    ShardedFeatureProcessedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from torchrec_compress.distributed.embeddingbag import CPURowWiseEmbeddingBagCollectionSharder
from torchrec_compress.distributed.in_backward import (
    copy_in_backward_optimizers,
    in_backward_group,
    step_in_backward,
)
from torchrec_compress.guards import FeatureIdRanges
from torchrec_compress.methods.lowrank.module import (
    CompositeLowRankEmbeddingBagCollection,
    LowRankEmbeddingBagCollection,
    check_fixed_batch,
)


@dataclass
class LowRankEmbeddingBagCollectionContext(Multistreamable):
    """The factor collection's context plus the mean's bag coefficients of the local batch.

    Args:
        factor (Optional[Multistreamable]): the sharded factor collection's own context (an
            EBC's, a PQ collection's, ...).
        bag_coefficients (list[Tensor]): per compressed table, ``(B, F_t)`` (see
            ``LowRankLayout.bag_coefficients``).
        features (Optional[KeyedJaggedTensor]): the local batch, kept when its coefficients
            need the enclosing FPEBC's feature processors: they are applied when the output is
            projected, with the processors' current parameters and gradients (the input dist
            may run a batch ahead, without gradients, in ``TrainPipelineSparseDist``).
    """

    factor: Multistreamable | None = None
    bag_coefficients: list[Tensor] = field(default_factory=list)
    features: KeyedJaggedTensor | None = None

    def record_stream(self, stream: torch.Stream) -> None:
        if self.factor is not None:
            self.factor.record_stream(stream)
        for coefficients in self.bag_coefficients:
            coefficients.record_stream(stream)
        if self.features is not None:
            self.features.record_stream(stream)


def _dense_replica(
    params: nn.ParameterDict,
    device: torch.device,
    initial: Callable[..., Tensor],
    pg: dist.ProcessGroup | None,
) -> tuple[nn.ParameterDict, list[str]]:
    """``params`` on ``device`` (replicated), and the names of those trained in backward.

    A parameter already on ``device`` is kept, like DMP keeps any dense parameter; one on
    ``meta`` starts at ``initial(*shape)``, the unsharded module's initial value (identity
    projection, zero mean), until a checkpoint is loaded.

    A parameter with in-backward optimizers (TorchRec's ``apply_optimizer_in_backward`` recipe,
    e.g. ``RowWiseAdagrad`` on ``sparse_arch.parameters()``) gets a fresh replica whose gradient
    is averaged over ``pg`` before its optimizers step: DDP's own overlap of in-backward
    optimizers needs an accelerator stream, so these replicas are kept out of DDP instead.
    """
    replica = nn.ParameterDict()
    in_backward: list[str] = []
    for name, param in params.items():
        classes = getattr(param, "_optimizer_classes", [])
        if param.device == device and not classes:
            replica[name] = param
            continue
        if param.is_meta:
            value = initial(*param.shape, device=device, dtype=param.dtype)
        else:
            value = param.detach().to(device)
        new = nn.Parameter(value, requires_grad=param.requires_grad)
        replica[name] = new
        if not classes:
            continue
        in_backward.append(name)
        copy_in_backward_optimizers(param, new)
        step_in_backward(new, pg)
    return replica, in_backward


class ShardedLowRankEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, list[Tensor], KeyedTensor, LowRankEmbeddingBagCollectionContext]
):
    """``LowRankEmbeddingBagCollection`` with TorchRec-sharded factor tables and dense projections.

    Built by :class:`LowRankEmbeddingBagCollectionSharder` through ``DistributedModelParallel``.
    Its output equals the unsharded module's on the same local batch.  When the source module is
    not on ``meta``, its projections and means are copied in (the factor tables follow the EBC
    sharder's rules: on CPU they are not copied, see ``load_full_state_dict_``).

    Args:
        module (LowRankEmbeddingBagCollection): the unsharded module (any device).
        table_name_to_parameter_sharding (dict[str, ParameterSharding]): plan of the factor tables.
        factor_sharder (ModuleSharder[nn.Module]): shards ``module.factor_ebc`` (an EBC sharder;
            the PQ sharder or :class:`ReplicatedCollectionSharder` for a
            ``CompositeLowRankEmbeddingBagCollection``).
        env (ShardingEnv): process group, rank and world size.
        device (torch.device): where the local shards and the dense replicas live.
        module_fqn (Optional[str]): the module's path in the model.

    Example::

        >>> # 2 processes, see tests/distributed/test_lowrank_embeddingbag.py
        >>> # dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
        >>> #                                sharders=default_sharders())
    """

    def __init__(
        self,
        module: LowRankEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        factor_sharder: ModuleSharder[nn.Module],
        env: ShardingEnv,
        device: torch.device,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__()
        self._layout = module.layout()
        # packed tables: ids are checked against the original rows before they become slots
        self._packed_id_ranges = (
            FeatureIdRanges(
                [t for t in module.embedding_bag_configs() if t.name in self._layout.packing]
            )
            if self._layout.packing
            else None
        )
        self._is_weighted: bool = module.is_weighted()
        self._embedding_bag_configs = module.embedding_bag_configs()
        self.factor_ebc: ShardedModule[Any, Any, Any, Any] = factor_sharder.shard(
            module.factor_ebc,
            table_name_to_parameter_sharding,
            env=env,
            device=device,
            module_fqn=module_fqn,
        )
        # the factor collection's lookups (TorchRec's pipelines read them), not registered twice
        self._lookups: list[nn.Module] = getattr(self.factor_ebc, "_lookups", [])
        in_backward = any(
            hasattr(p, "_optimizer_classes")
            for p in [*module.projection.values(), *module.mean.values()]
        )
        pg = in_backward_group(env.process_group, in_backward) if env.process_group else None
        self.projection, projections_in_backward = _dense_replica(
            module.projection, device, torch.eye, pg
        )
        self.mean, means_in_backward = _dense_replica(module.mean, device, torch.zeros, pg)
        # replicas that this module keeps in sync itself (see _dense_replica), not DDP
        self._self_synced: list[str] = [f"projection.{n}" for n in projections_in_backward] + [
            f"mean.{n}" for n in means_in_backward
        ]
        # set by FeatureProcessedLowRankSharder: the feature processors of the enclosing FPEBC,
        # whose weights the mean's coefficients need (a bound method, not a submodule)
        self.process_features: Callable[[KJTList], KJTList] | None = None

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original (uncompressed) table configs."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def create_context(self) -> LowRankEmbeddingBagCollectionContext:
        return LowRankEmbeddingBagCollectionContext(factor=self.factor_ebc.create_context())

    def input_dist(
        self, ctx: LowRankEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        check_fixed_batch(features, type(self).__name__)
        if self._packed_id_ranges is not None:  # the factor EBC sees ids // p: check them here
            self._packed_id_ranges.check(features)
        if self.process_features is not None:
            ctx.features = features
        else:
            ctx.bag_coefficients = self._layout.bag_coefficients(features)
        return self.factor_ebc.input_dist(ctx.factor, self._layout.factor_features(features))

    def compute(
        self, ctx: LowRankEmbeddingBagCollectionContext, dist_input: KJTList
    ) -> list[Tensor]:
        return self.factor_ebc.compute(ctx.factor, dist_input)

    def output_dist(
        self, ctx: LowRankEmbeddingBagCollectionContext, output: list[Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._projected(ctx, self.factor_ebc.output_dist(ctx.factor, output))

    def compute_and_output_dist(
        self, ctx: LowRankEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self._projected(ctx, self.factor_ebc.compute_and_output_dist(ctx.factor, input))

    def _projected(
        self, ctx: LowRankEmbeddingBagCollectionContext, factors: LazyAwaitable[KeyedTensor]
    ) -> LazyAwaitable[KeyedTensor]:
        factors.callbacks.append(
            lambda kt: self._layout.project(
                kt, self._coefficients(ctx), self.projection, self.mean, keys_in_order=False
            )
        )
        return factors

    def _coefficients(self, ctx: LowRankEmbeddingBagCollectionContext) -> list[Tensor]:
        if ctx.features is not None and self.process_features is not None:
            processed = self.process_features(KJTList([ctx.features]))[0]
            return self._layout.bag_coefficients(processed)
        return ctx.bag_coefficients

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # what DDP must leave alone: the factor tables, and the replicas trained in backward
        yield from self.factor_ebc.sharded_parameter_names(append_prefix(prefix, "factor_ebc"))
        for name in self._self_synced:
            yield append_prefix(prefix, name)

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        initialize = getattr(self.factor_ebc, "_initialize_torch_state", None)
        if initialize is not None:
            initialize(skip_registering)


class LowRankEmbeddingBagCollectionSharder(BaseEmbeddingSharder[LowRankEmbeddingBagCollection]):
    """Shards a :class:`LowRankEmbeddingBagCollection` as one unit (factor tables by an EBC sharder).

    The planner sees the factor tables (rows x k, so it sizes the compressed footprint) with the
    EBC sharder's sharding types and kernels; projections and means stay dense.  A low-rank
    collection whose factor tables are compressed again (AFM, then MEC/PQ or int8) is a
    ``CompositeLowRankEmbeddingBagCollection``: :class:`CompositeLowRankSharder` shards it.

    Args:
        ebc_sharder (Optional[EmbeddingBagCollectionSharder]): shards the factor EBC; defaults to
            :class:`~torchrec_compress.distributed.embeddingbag.CPURowWiseEmbeddingBagCollectionSharder`.
        qcomm_codecs_registry (Optional[dict[str, QuantizedCommCodecs]]): as for TorchRec's.

    Example::

        >>> from torchrec import EmbeddingBagConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> module = LowRankEmbeddingBagCollection([cfg], ranks={"t": 4})
        >>> sharder = LowRankEmbeddingBagCollectionSharder()
        >>> {n: tuple(p.shape) for n, p in sharder.shardable_parameters(module).items()}
        {'t': (10, 4)}
    """

    def __init__(
        self,
        ebc_sharder: EmbeddingBagCollectionSharder | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._factor_sharder: ModuleSharder[Any] = (
            ebc_sharder
            or CPURowWiseEmbeddingBagCollectionSharder(
                qcomm_codecs_registry=self.qcomm_codecs_registry
            )
        )

    def shard(
        self,
        module: LowRankEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedLowRankEmbeddingBagCollection:
        return ShardedLowRankEmbeddingBagCollection(
            module,
            params,
            factor_sharder=self._factor_sharder,
            env=env,
            device=device if device is not None else torch.device("cuda"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(
        self, module: LowRankEmbeddingBagCollection
    ) -> dict[str, nn.Parameter]:
        return self._factor_sharder.shardable_parameters(module.factor_ebc)

    @property
    def fused_params(self) -> dict[str, Any] | None:
        return getattr(self._factor_sharder, "fused_params", None)

    @property
    def module_type(self) -> type[LowRankEmbeddingBagCollection]:
        return LowRankEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedLowRankEmbeddingBagCollection]:
        return ShardedLowRankEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._factor_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return self._factor_sharder.compute_kernels(sharding_type, compute_device_type)


class CompositeLowRankSharder(LowRankEmbeddingBagCollectionSharder):
    """Shards a ``CompositeLowRankEmbeddingBagCollection`` (AFM, then MEC/PQ or int8 of its
    factor tables) as one unit, like a plain low-rank collection: its factor collection by the
    sharder of the factor collection's type (the PQ sharder; :class:`ReplicatedCollectionSharder`
    for int8 rows, kept whole on every process), its projections and means as dense replicas
    (in-backward optimizers included).

    The planner asks a sharder for its sharding types once per module type, so every composite
    collection of a model must have factor collections of one kind: the planner is offered the
    sharding types of ``factor_sharder``, which ``torchrec_compress.sharders(model)`` picks
    from the model.

    Args:
        factor_sharder (ModuleSharder[nn.Module]): the sharder whose sharding types and kernels
            the planner is offered.
        factor_sharders (Sequence[ModuleSharder[nn.Module]]): every sharder of factor
            collections, by module type (``factor_sharder`` is added).

    Example::

        >>> from torchrec_compress.methods.rowwise_quant.sharded import ReplicatedCollectionSharder
        >>> CompositeLowRankSharder(ReplicatedCollectionSharder()).sharding_types("cpu")
        ['data_parallel']
    """

    def __init__(
        self,
        factor_sharder: ModuleSharder[Any],
        factor_sharders: Sequence[ModuleSharder[Any]] = (),
    ) -> None:
        super().__init__()
        self._factor_sharder = factor_sharder
        self._by_type: dict[type[nn.Module], ModuleSharder[Any]] = {
            s.module_type: s for s in [*factor_sharders, factor_sharder]
        }

    def _sharder_of(self, module: LowRankEmbeddingBagCollection) -> ModuleSharder[Any]:
        kind = type(module.factor_ebc)
        if kind not in self._by_type:
            raise ValueError(
                f"no sharder for factor collections of type {kind.__name__}; known: "
                f"{sorted(t.__name__ for t in self._by_type)}"
            )
        return self._by_type[kind]

    def shard(
        self,
        module: LowRankEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedLowRankEmbeddingBagCollection:
        return ShardedLowRankEmbeddingBagCollection(
            module,
            params,
            factor_sharder=self._sharder_of(module),
            env=env,
            device=device if device is not None else torch.device("cuda"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(
        self, module: LowRankEmbeddingBagCollection
    ) -> dict[str, nn.Parameter]:
        return self._sharder_of(module).shardable_parameters(module.factor_ebc)

    @property
    def module_type(self) -> type[LowRankEmbeddingBagCollection]:
        return CompositeLowRankEmbeddingBagCollection


class ShardedFeatureProcessedLowRankEmbeddingBagCollection(
    ShardedFeatureProcessedEmbeddingBagCollection
):
    """TorchRec's sharded FPEBC, around a plain, a low-rank or a composite low-rank collection.

    The feature processors run on the distributed ids as in TorchRec, and for a low-rank
    collection on the local batch too, for the mean's coefficients; the projection and mean are
    dense replicas.  When the factor tables are product-quantized (AFM, then MEC/PQ), the factor
    collection pools every bag on the process that asked for it, from code bytes sent back: the
    processors then run on the local batch just before pooling, as for a product-quantized FPEBC.

    Two things differ from TorchRec's own sharded FPEBC, whatever the collection:

    * processor parameters trained in backward (TorchRec's recipe on
      ``sparse_arch.parameters()``) step on gradients averaged over the processes, outside DDP,
      whose in-backward path needs an accelerator ("Cannot access accelerator device");
    * row-wise sharding pre-processes the bags' positions into a copy of the input: TorchRec's
      writes them into the caller's ``KeyedJaggedTensor`` (its weights), so a batch used twice
      (an evaluation set, a reference model) gave different results the second time;
    * after ``TrainPipelineSparseDist.detach()`` the module pre-processes its input again
      (TorchRec's stays marked as pipelined and fails: "doesn't have weights").

    Args:
        module (FeatureProcessedEmbeddingBagCollection): the unsharded module.
        table_name_to_parameter_sharding (dict[str, ParameterSharding]): plan of its tables.
        ebc_sharder (ModuleSharder[nn.Module]): shards its collection (an EBC sharder, or a
            low-rank one).
        env (ShardingEnv): process group, rank and world size.
        device (torch.device): where the local shards and the dense replicas live.
        module_fqn (Optional[str]): the module's path in the model.

    Example::

        >>> # 2 processes, see tests/distributed/test_matrix.py
    """

    def __init__(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        ebc_sharder: ModuleSharder[Any],
        env: ShardingEnv,
        device: torch.device,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__(
            module,
            table_name_to_parameter_sharding,
            ebc_sharder,  # any sharder of the collection
            env,
            device,
            module_fqn,
        )
        collection = self._embedding_bag_collection
        lowrank = (
            collection if isinstance(collection, ShardedLowRankEmbeddingBagCollection) else None
        )
        if lowrank is not None:
            lowrank.process_features = self.apply_feature_processors_to_kjt_list
        # a PQ factor collection receives ids, not a KJT: its bags are processed where pooled
        self._pools_locally: bool = lowrank is not None and hasattr(
            lowrank.factor_ebc, "process_local_features"
        )
        self._in_backward: list[str] = [
            name
            for name, p in self._feature_processors.named_parameters()
            if hasattr(p, "_in_backward_optimizers")
        ]
        pg = env.process_group
        group = in_backward_group(pg, bool(self._in_backward)) if pg is not None else None
        for name in self._in_backward:
            step_in_backward(self._feature_processors.get_parameter(name), group)

    def input_dist(self, ctx: Any, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        if self._pools_locally:
            return self._embedding_bag_collection.input_dist(ctx, features)
        # TorchRec's pipelines set is_pipelined and leave it set when they detach: whether
        # this forward is a pipeline's is whether the module's forward is still its own method
        self.is_pipelined = not inspect.ismethod(self.forward)
        if not self.is_pipelined and self._row_wise_sharded:
            # TorchRec writes the positions into the input's weights: give it a copy
            features = _unweighted_copy(features)
        return super().input_dist(ctx, features)

    def preprocess_input(
        self, args: list[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], Mapping[str, Any]]:
        """What ``TrainPipelineSparseDist`` calls before the input dist: TorchRec's writes the
        bags' positions into the batch's own KJT (row-wise); this one into a copy, and not at
        all when the bags are processed where they are pooled."""
        if self._pools_locally or not self._row_wise_sharded:
            return args, kwargs
        copies = [_unweighted_copy(a) if isinstance(a, KeyedJaggedTensor) else a for a in args]
        named = {
            k: _unweighted_copy(v) if isinstance(v, KeyedJaggedTensor) else v
            for k, v in kwargs.items()
        }
        return super().preprocess_input(copies, named)

    def compute(self, ctx: Any, dist_input: KJTList) -> Any:
        if self._pools_locally:
            return self._embedding_bag_collection.compute(ctx, dist_input)
        return super().compute(ctx, dist_input)

    def output_dist(self, ctx: Any, output: Any) -> LazyAwaitable[KeyedTensor]:
        if self._pools_locally:
            lowrank = self._embedding_bag_collection
            assert isinstance(lowrank, ShardedLowRankEmbeddingBagCollection)
            lowrank.factor_ebc.process_local_features(
                ctx.factor, self._feature_processors, self._is_collection
            )
        return super().output_dist(ctx, output)

    def compute_and_output_dist(self, ctx: Any, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        if not self._pools_locally:
            return super().compute_and_output_dist(ctx, input)
        return self.output_dist(ctx, self.compute(ctx, input))

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        if isinstance(self._embedding_bag_collection, ShardedLowRankEmbeddingBagCollection):
            yield from self._embedding_bag_collection.sharded_parameter_names(
                append_prefix(prefix, "_embedding_bag_collection")
            )
        else:
            yield from super().sharded_parameter_names(prefix)
        for name in self._in_backward:
            yield append_prefix(prefix, f"_feature_processors.{name}")


def _unweighted_copy(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A KJT over the same ids and lengths, without weights (TorchRec's row-wise feature
    processing writes the bags' positions into an input's weights)."""
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        lengths=features.lengths(),
        offsets=features.offsets(),
        stride=features.stride(),
    )


class FeatureProcessedLowRankSharder(FeatureProcessedEmbeddingBagCollectionSharder):
    """TorchRec's FPEBC sharder that also shards an FPEBC whose collection is low-rank.

    ``compress_`` swaps an FPEBC's inner EBC for a ``LowRankEmbeddingBagCollection`` (or, after
    a second method, a ``CompositeLowRankEmbeddingBagCollection``; or, row-wise quantized,
    TorchRec's quantized collection); TorchRec's sharder would then ask it for
    ``embedding_bags``.  This one sizes and shards it with
    :class:`LowRankEmbeddingBagCollectionSharder` (or ``collection_sharder``), and plain EBCs
    with the EBC sharder, into :class:`ShardedFeatureProcessedLowRankEmbeddingBagCollection`.

    Args:
        ebc_sharder (Optional[EmbeddingBagCollectionSharder]): shards plain EBCs and the factor
            EBCs; defaults to the project's row-wise-on-CPU EBC sharder.
        qcomm_codecs_registry (Optional[dict[str, QuantizedCommCodecs]]): as for TorchRec's.
        collection_sharder (Optional[ModuleSharder[nn.Module]]): shards the model's FPEBC
            collections when they are composite low-rank (:class:`CompositeLowRankSharder`) or
            row-wise quantized (``ReplicatedCollectionSharder``); given, the planner is offered
            its sharding types and kernels.

    Example::

        >>> sharder = FeatureProcessedLowRankSharder()
        >>> sharder.module_type.__name__
        'FeatureProcessedEmbeddingBagCollection'
    """

    def __init__(
        self,
        ebc_sharder: EmbeddingBagCollectionSharder | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        collection_sharder: ModuleSharder[Any] | None = None,
    ) -> None:
        ebc_sharder = ebc_sharder or CPURowWiseEmbeddingBagCollectionSharder(
            qcomm_codecs_registry=qcomm_codecs_registry
        )
        super().__init__(ebc_sharder, qcomm_codecs_registry)
        self._lowrank_sharder = LowRankEmbeddingBagCollectionSharder(
            ebc_sharder, qcomm_codecs_registry
        )
        self._other_sharder = collection_sharder

    def _collection_sharder(
        self, module: FeatureProcessedEmbeddingBagCollection
    ) -> ModuleSharder[Any] | None:
        """The sharder of the FPEBC's compressed collection; ``None`` for a plain EBC."""
        collection = module._embedding_bag_collection
        if type(collection) is LowRankEmbeddingBagCollection:
            return self._lowrank_sharder
        if isinstance(collection, EmbeddingBagCollection):
            return None
        if self._other_sharder is None or type(collection) is not self._other_sharder.module_type:
            tables = [t.name for t in collection.embedding_bag_configs()]
            raise ValueError(
                f"a FeatureProcessedEmbeddingBagCollection holds a {type(collection).__name__} "
                f"(tables {tables}): build the sharders with torchrec_compress.sharders(model), "
                "which picks the sharder for the model's FPEBCs (for product-quantized ones "
                "PQFeatureProcessedEmbeddingBagCollectionSharder)"
            )
        return self._other_sharder

    def shard(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedFeatureProcessedEmbeddingBagCollection:
        sharder: ModuleSharder[Any] | None = self._collection_sharder(module)
        collection = module._embedding_bag_collection
        if sharder is None:
            sharder = self._ebc_sharder
        elif isinstance(collection, LowRankEmbeddingBagCollection) and collection.layout().packing:
            packed = sorted(collection.layout().packing)
            raise ValueError(
                f"tables {packed} of a FeatureProcessedEmbeddingBagCollection have ranks that are "
                "not multiples of 4 (stored packed): the sharded feature processors cannot read "
                "their slot features; choose ranks that are multiples of 4 for them (e.g. rank=4)"
            )
        return ShardedFeatureProcessedLowRankEmbeddingBagCollection(
            module,
            params,
            ebc_sharder=sharder,
            env=env,
            device=device if device is not None else torch.device("cuda"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(
        self, module: FeatureProcessedEmbeddingBagCollection
    ) -> dict[str, nn.Parameter]:
        sharder = self._collection_sharder(module)
        if sharder is not None:
            return sharder.shardable_parameters(module._embedding_bag_collection)
        return super().shardable_parameters(module)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if self._other_sharder is not None:
            return self._other_sharder.sharding_types(compute_device_type)
        # TorchRec's, less what the EBC sharder does not offer (data_parallel, for tables with
        # in-backward optimizers)
        offered = set(self._ebc_sharder.sharding_types(compute_device_type))
        return [t for t in super().sharding_types(compute_device_type) if t in offered]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if self._other_sharder is not None:
            return self._other_sharder.compute_kernels(sharding_type, compute_device_type)
        return super().compute_kernels(sharding_type, compute_device_type)
