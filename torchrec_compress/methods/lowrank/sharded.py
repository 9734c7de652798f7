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
position-weighted features) is sharded by the shared
:class:`~torchrec_compress.distributed.fp_embeddingbag.FeatureProcessedCollectionSharder`: the
mean's coefficients need the processed weights of the local batch, so the sharded collection
takes the feature processors (``process_features``) and applies them to it locally as well as,
by TorchRec, to the distributed ids.
"""

from collections.abc import Callable, Iterator, Mapping
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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from torchrec_compress.distributed.embeddingbag import CPURowWiseEmbeddingBagCollectionSharder
from torchrec_compress.distributed.in_backward import (
    copy_in_backward_optimizers,
    in_backward_group,
    step_in_backward,
)
from torchrec_compress.guards import FeatureIdRanges, check_fixed_batch
from torchrec_compress.methods.lowrank.module import (
    CompositeLowRankEmbeddingBagCollection,
    LowRankEmbeddingBagCollection,
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
        # set by the sharded FPEBC around it: the feature processors of the enclosing FPEBC,
        # whose weights the mean's coefficients need (a bound method, not a submodule)
        self.process_features: Callable[[KJTList], KJTList] | None = None

    @property
    def pools_locally(self) -> bool:
        """Whether the factor collection pools every bag where it was asked for (product
        quantized): an enclosing FPEBC then processes the local batch before pooling."""
        return hasattr(self.factor_ebc, "process_local_features")

    def process_local_features(
        self, ctx: LowRankEmbeddingBagCollectionContext, processors: nn.Module, is_collection: bool
    ) -> None:
        """An enclosing FPEBC's feature processors, applied by the factor collection."""
        self.factor_ebc.process_local_features(ctx.factor, processors, is_collection)

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

    def _offered(self) -> ModuleSharder[Any]:
        """The sharder whose sharding types and kernels the planner is offered."""
        return self._factor_sharder

    @property
    def fused_params(self) -> dict[str, Any] | None:
        return getattr(self._offered(), "fused_params", None)

    @property
    def module_type(self) -> type[LowRankEmbeddingBagCollection]:
        return LowRankEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedLowRankEmbeddingBagCollection]:
        return ShardedLowRankEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._offered().sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return self._offered().compute_kernels(sharding_type, compute_device_type)

    def check_feature_processed(self, module: LowRankEmbeddingBagCollection) -> None:
        """Refuses a collection inside an FPEBC whose tables are stored packed.

        Raises:
            ValueError: naming the tables whose ranks are not multiples of 4.
        """
        packed = sorted(module.layout().packing)
        if packed:
            raise ValueError(
                f"tables {packed} of a FeatureProcessedEmbeddingBagCollection have ranks that "
                "are not multiples of 4 (stored packed): the sharded feature processors cannot "
                "read their slot features; choose ranks that are multiples of 4 for them "
                "(e.g. rank=4)"
            )


class CompositeLowRankSharder(LowRankEmbeddingBagCollectionSharder):
    """Shards a ``CompositeLowRankEmbeddingBagCollection`` (AFM, then MEC/PQ or int8 of its
    factor tables) as one unit, like a plain low-rank collection: its factor collection by the
    sharder of the factor collection's type (another method's, found in ``by_type`` when the
    model is planned and sharded), its projections and means as dense replicas (in-backward
    optimizers included).

    The planner asks a sharder for its sharding types once per module type, so every composite
    collection of a model must have factor collections of one kind, ``factor_kind``: the planner
    is offered the sharding types of its sharder (by default, of the first collection type in
    ``by_type`` that is not low-rank: the product-quantized one).

    Args:
        by_type (Mapping[type[nn.Module], ModuleSharder[nn.Module]]): the sharder of each
            compressed collection type (filled by every method before it is read).
        factor_kind (Optional[type[nn.Module]]): the type of the model's factor collections.

    Example::

        >>> from torchrec_compress.registry import SharderContext, method_sharders
        >>> context = SharderContext(model=None, ebc_sharder=CPURowWiseEmbeddingBagCollectionSharder())
        >>> _ = method_sharders(context)
        >>> context.by_type[CompositeLowRankEmbeddingBagCollection].sharding_types("cpu")[:2]
        ['table_wise', 'row_wise']
    """

    def __init__(
        self,
        by_type: Mapping[type[nn.Module], ModuleSharder[Any]],
        factor_kind: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._by_type = by_type
        self._factor_kind = factor_kind

    def _offered(self) -> ModuleSharder[Any]:
        if self._factor_kind is not None:
            return self._by_type[self._factor_kind]
        own = (LowRankEmbeddingBagCollection, CompositeLowRankEmbeddingBagCollection)
        return next(s for t, s in self._by_type.items() if t not in own)

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
