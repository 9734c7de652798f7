"""Sharded low-rank EmbeddingBagCollection: factor tables sharded by TorchRec, projection dense.

A :class:`~torchrec_compress.modules.lowrank_embedding_bag.LowRankEmbeddingBagCollection` is
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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
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
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
)
from torchrec.distributed.fp_embeddingbag import (
    FeatureProcessedEmbeddingBagCollectionSharder,
    ShardedFeatureProcessedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.distributed.embeddingbag import CPURowWiseEmbeddingBagCollectionSharder
from torchrec_compress.guards import FeatureIdRanges
from torchrec_compress.modules.lowrank_embedding_bag import (
    LowRankEmbeddingBagCollection,
    check_fixed_batch,
)


@dataclass
class LowRankEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """The factor EBC's context plus the mean's bag coefficients of the local batch.

    Args:
        bag_coefficients (list[Tensor]): per compressed table, ``(B, F_t)`` (see
            ``LowRankLayout.bag_coefficients``).
    """

    bag_coefficients: list[Tensor] = field(default_factory=list)

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        for coefficients in self.bag_coefficients:
            coefficients.record_stream(stream)


def _average_gradient(param: Tensor, pg: dist.ProcessGroup) -> None:
    """What DDP does for a replicated parameter: the gradient becomes the mean over processes."""
    if param.grad is not None:
        dist.all_reduce(param.grad, group=pg)
        param.grad.div_(dist.get_world_size(pg))


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
        if pg is not None:
            new.register_post_accumulate_grad_hook(partial(_average_gradient, pg=pg))
        for optimizer_class, kwargs in zip(classes, param._optimizer_kwargs, strict=True):
            apply_optimizer_in_backward(optimizer_class, [new], kwargs)
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
        ebc_sharder (EmbeddingBagCollectionSharder): shards ``module.factor_ebc``.
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
        ebc_sharder: EmbeddingBagCollectionSharder,
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
        self.factor_ebc = ebc_sharder.shard(
            module.factor_ebc,
            table_name_to_parameter_sharding,
            env=env,
            device=device,
            module_fqn=module_fqn,
        )
        # the factor EBC's lookups (TorchRec's pipelines read them), not registered twice
        self._lookups: list[nn.Module] = self.factor_ebc._lookups
        pg = env.process_group
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
        return LowRankEmbeddingBagCollectionContext()

    def input_dist(
        self, ctx: LowRankEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        check_fixed_batch(features, type(self).__name__)
        if self._packed_id_ranges is not None:  # the factor EBC sees ids // p: check them here
            self._packed_id_ranges.check(features)
        local = features
        if self.process_features is not None:
            local = self.process_features(KJTList([features]))[0]
        ctx.bag_coefficients = self._layout.bag_coefficients(local)
        return self.factor_ebc.input_dist(ctx, self._layout.factor_features(features))

    def compute(
        self, ctx: LowRankEmbeddingBagCollectionContext, dist_input: KJTList
    ) -> list[Tensor]:
        return self.factor_ebc.compute(ctx, dist_input)

    def output_dist(
        self, ctx: LowRankEmbeddingBagCollectionContext, output: list[Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._projected(ctx, self.factor_ebc.output_dist(ctx, output))

    def compute_and_output_dist(
        self, ctx: LowRankEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self._projected(ctx, self.factor_ebc.compute_and_output_dist(ctx, input))

    def _projected(
        self, ctx: LowRankEmbeddingBagCollectionContext, factors: LazyAwaitable[KeyedTensor]
    ) -> LazyAwaitable[KeyedTensor]:
        coefficients = ctx.bag_coefficients
        factors.callbacks.append(
            lambda kt: self._layout.project(
                kt, coefficients, self.projection, self.mean, keys_in_order=False
            )
        )
        return factors

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # what DDP must leave alone: the factor tables, and the replicas trained in backward
        yield from self.factor_ebc.sharded_parameter_names(append_prefix(prefix, "factor_ebc"))
        for name in self._self_synced:
            yield append_prefix(prefix, name)

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        self.factor_ebc._initialize_torch_state(skip_registering)


class LowRankEmbeddingBagCollectionSharder(BaseEmbeddingSharder[LowRankEmbeddingBagCollection]):
    """Shards a :class:`LowRankEmbeddingBagCollection` as one unit (factor tables by an EBC sharder).

    The planner sees the factor tables (rows x k, so it sizes the compressed footprint) with the
    EBC sharder's sharding types and kernels; projections and means stay dense.  Only plain
    ``EmbeddingBagCollection`` factor collections come here: a low-rank collection whose factor
    tables are product-quantized is a ``CompositeLowRankEmbeddingBagCollection``, which DMP walks
    into so that the PQ sharder shards its factor collection.

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
        self._ebc_sharder: EmbeddingBagCollectionSharder = (
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
            ebc_sharder=self._ebc_sharder,
            env=env,
            device=device if device is not None else torch.device("cuda"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(
        self, module: LowRankEmbeddingBagCollection
    ) -> dict[str, nn.Parameter]:
        return self._ebc_sharder.shardable_parameters(module.factor_ebc)

    @property
    def fused_params(self) -> dict[str, Any] | None:
        return self._ebc_sharder.fused_params

    @property
    def module_type(self) -> type[LowRankEmbeddingBagCollection]:
        return LowRankEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedLowRankEmbeddingBagCollection]:
        return ShardedLowRankEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._ebc_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)


class ShardedFeatureProcessedLowRankEmbeddingBagCollection(
    ShardedFeatureProcessedEmbeddingBagCollection
):
    """TorchRec's sharded FPEBC around a :class:`ShardedLowRankEmbeddingBagCollection`.

    The feature processors run on the distributed ids as in TorchRec, and on the local batch for
    the mean's coefficients; the projection and mean are dense (DDP), not sharded parameters.

    Args:
        module (FeatureProcessedEmbeddingBagCollection): holds a ``LowRankEmbeddingBagCollection``.
        table_name_to_parameter_sharding (dict[str, ParameterSharding]): plan of the factor tables.
        ebc_sharder (LowRankEmbeddingBagCollectionSharder): shards the low-rank collection.
        env (ShardingEnv): process group, rank and world size.
        device (torch.device): where the local shards and the dense replicas live.
        module_fqn (Optional[str]): the module's path in the model.

    Example::

        >>> # 2 processes, see tests/distributed/test_lowrank_embeddingbag.py
    """

    def __init__(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        ebc_sharder: LowRankEmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__(
            module,
            table_name_to_parameter_sharding,
            ebc_sharder,  # shards the low-rank collection where TorchRec's shards an EBC
            env,
            device,
            module_fqn,
        )
        lowrank = self._embedding_bag_collection
        assert isinstance(lowrank, ShardedLowRankEmbeddingBagCollection)
        lowrank.process_features = self.apply_feature_processors_to_kjt_list

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        yield from self._embedding_bag_collection.sharded_parameter_names(
            append_prefix(prefix, "_embedding_bag_collection")
        )


class FeatureProcessedLowRankSharder(FeatureProcessedEmbeddingBagCollectionSharder):
    """TorchRec's FPEBC sharder that also shards an FPEBC whose collection is low-rank.

    ``compress_`` swaps an FPEBC's inner EBC for a ``LowRankEmbeddingBagCollection``; TorchRec's
    sharder would then ask it for ``embedding_bags``.  This one sizes and shards it with
    :class:`LowRankEmbeddingBagCollectionSharder` and leaves plain FPEBCs to TorchRec's code.

    Args:
        ebc_sharder (Optional[EmbeddingBagCollectionSharder]): shards plain EBCs and the factor
            EBCs; defaults to the project's row-wise-on-CPU EBC sharder.
        qcomm_codecs_registry (Optional[dict[str, QuantizedCommCodecs]]): as for TorchRec's.

    Example::

        >>> sharder = FeatureProcessedLowRankSharder()
        >>> sharder.module_type.__name__
        'FeatureProcessedEmbeddingBagCollection'
    """

    def __init__(
        self,
        ebc_sharder: EmbeddingBagCollectionSharder | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        ebc_sharder = ebc_sharder or CPURowWiseEmbeddingBagCollectionSharder(
            qcomm_codecs_registry=qcomm_codecs_registry
        )
        super().__init__(ebc_sharder, qcomm_codecs_registry)
        self._lowrank_sharder = LowRankEmbeddingBagCollectionSharder(
            ebc_sharder, qcomm_codecs_registry
        )

    def shard(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedFeatureProcessedEmbeddingBagCollection:
        collection = module._embedding_bag_collection
        if type(collection) is not LowRankEmbeddingBagCollection:
            return super().shard(module, params, env, device, module_fqn)
        packed = sorted(collection.layout().packing)
        if packed:
            raise ValueError(
                f"tables {packed} of a FeatureProcessedEmbeddingBagCollection have ranks that are "
                "not multiples of 4 (stored packed): the sharded feature processors cannot read "
                "their slot features; choose ranks that are multiples of 4 (rank_multiple=4)"
            )
        return ShardedFeatureProcessedLowRankEmbeddingBagCollection(
            module,
            params,
            ebc_sharder=self._lowrank_sharder,
            env=env,
            device=device if device is not None else torch.device("cuda"),
            module_fqn=module_fqn,
        )

    def shardable_parameters(
        self, module: FeatureProcessedEmbeddingBagCollection
    ) -> dict[str, nn.Parameter]:
        collection = module._embedding_bag_collection
        if type(collection) is LowRankEmbeddingBagCollection:
            return self._lowrank_sharder.shardable_parameters(collection)
        return super().shardable_parameters(module)
