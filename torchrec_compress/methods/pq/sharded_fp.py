"""A ``FeatureProcessedEmbeddingBagCollection`` over a PQ collection, sharded: the PQ
collection's own FPEBC sharder (its bags are processed where they are pooled)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    ShardedModule,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix, init_parameters
from torchrec.modules.feature_processor_ import FeatureProcessorsCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.distributed.in_backward import (
    InBackwardFusedOptimizer,
    in_backward_group,
    step_in_backward,
)
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.sharded import (
    PQEmbeddingBagCollectionSharder,
    PQShardingContext,
    ShardedPQEmbeddingBagCollection,
)


class ShardedPQFeatureProcessedEmbeddingBagCollection(
    ShardedModule[KJTList, Tensor, KeyedTensor, PQShardingContext], FusedOptimizerModule
):
    """A ``FeatureProcessedEmbeddingBagCollection`` over a PQ collection, sharded.

    The inner ``PQEmbeddingBagCollection`` is sharded as :class:`ShardedPQEmbeddingBagCollection`
    (ids out, code bytes back); the feature processors (e.g. TorchRec's position weights) stay
    replicated dense modules and run where the bags are pooled, on the requesting process's own
    batch, just before pooling: so every bag keeps its positions whatever the sharding type
    (row-wise included), and the processors see the current parameters when
    ``TrainPipelineSparseDist`` starts the input dist a batch ahead.  ``state_dict`` keys are
    those of the unsharded module (``_embedding_bag_collection.codes.<table>``, ...).  In-backward
    optimizers (TorchRec's recipe on ``sparse_arch.parameters()``) on the codebooks and on the
    processors' parameters step on gradients averaged over the processes and are exposed as
    ``fused_optimizer``.

    Args:
        module (FeatureProcessedEmbeddingBagCollection): whose ``_embedding_bag_collection`` is a
            ``PQEmbeddingBagCollection`` (weighted).
        table_shardings (Dict[str, ParameterSharding]): the plan of every table's codes.
        env (ShardingEnv): process group, rank and world size.
        device (torch.device): where the shards and replicas live.

    Example::

        >>> # 2 processes, see tests/test_torchrec_stack_pq.py
        >>> # DistributedModelParallel(model, plan=plan, sharders=[
        >>> #     PQFeatureProcessedEmbeddingBagCollectionSharder(), *default_sharders()])
    """

    def __init__(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        table_shardings: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device,
    ) -> None:
        super().__init__()
        inner = _pq_collection_of(module)
        self._embedding_bag_collection = ShardedPQEmbeddingBagCollection(
            inner, table_shardings, env, device
        )
        self._feature_processors: nn.Module = module._feature_processors
        self._is_collection: bool = isinstance(
            module._feature_processors, FeatureProcessorsCollection
        )
        init_parameters(self._feature_processors, device)
        self._fused_processor_params: list[str] = [
            name
            for name, p in self._feature_processors.named_parameters()
            if hasattr(p, "_in_backward_optimizers")
        ]
        pg = in_backward_group(
            self._embedding_bag_collection._pg, bool(self._fused_processor_params)
        )
        for name in self._fused_processor_params:
            step_in_backward(self._feature_processors.get_parameter(name), pg)
        self._fused_optimizer = InBackwardFusedOptimizer(
            {
                **{
                    f"_embedding_bag_collection.{k}": p
                    for k, p in self._embedding_bag_collection.named_parameters()
                },
                **{
                    f"_feature_processors.{k}": p
                    for k, p in self._feature_processors.named_parameters()
                },
            }
        )

    def create_context(self) -> PQShardingContext:
        return PQShardingContext()

    def input_dist(
        self, ctx: PQShardingContext, features: KeyedJaggedTensor
    ) -> KJTListSplitsAwaitable[PQShardingContext]:
        """The inner collection's input dist: only the ids travel, the weights stay here."""
        return self._embedding_bag_collection.input_dist(ctx, features)

    def compute(self, ctx: PQShardingContext, dist_input: KJTList) -> Tensor:
        """The inner collection's code gather."""
        return self._embedding_bag_collection.compute(ctx, dist_input)

    def output_dist(self, ctx: PQShardingContext, output: Tensor) -> LazyAwaitable[KeyedTensor]:
        """Processes the local features (per-id weights), then the inner collection pools them."""
        self._embedding_bag_collection.process_local_features(
            ctx, self._feature_processors, self._is_collection
        )
        return self._embedding_bag_collection.output_dist(ctx, output)

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The in-backward optimizers of the codebooks and of the processors' parameters."""
        return self._fused_optimizer

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """What DDP skips: the inner collection's, and processor parameters updated in backward."""
        yield from self._embedding_bag_collection.sharded_parameter_names(
            append_prefix(prefix, "_embedding_bag_collection")
        )
        for name in self._fused_processor_params:
            yield append_prefix(prefix, f"_feature_processors.{name}")

    @property
    def unsharded_module_type(self) -> type[FeatureProcessedEmbeddingBagCollection]:
        return FeatureProcessedEmbeddingBagCollection


def _pq_collection_of(module: FeatureProcessedEmbeddingBagCollection) -> PQEmbeddingBagCollection:
    inner = module._embedding_bag_collection
    if not isinstance(inner, PQEmbeddingBagCollection):
        tables = [t.name for t in inner.embedding_bag_configs()]
        raise TypeError(
            f"PQFeatureProcessedEmbeddingBagCollectionSharder shards a "
            f"FeatureProcessedEmbeddingBagCollection whose collection is a "
            f"PQEmbeddingBagCollection; this one holds a {type(inner).__name__} (tables {tables}): "
            "shard it with TorchRec's FeatureProcessedEmbeddingBagCollectionSharder"
        )
    return inner


class PQFeatureProcessedEmbeddingBagCollectionSharder(
    ModuleSharder[FeatureProcessedEmbeddingBagCollection]
):
    """Shards a ``FeatureProcessedEmbeddingBagCollection`` whose collection was product-quantized.

    ``compress_`` swaps the inner ``EmbeddingBagCollection`` of an FPEBC for a
    ``PQEmbeddingBagCollection``; TorchRec's FPEBC sharder cannot plan that (it reads
    ``embedding_bags``).  Pass this sharder in its place: the planner sees the codes as
    :class:`PQEmbeddingBagCollectionSharder` shows them, and DMP builds a
    :class:`ShardedPQFeatureProcessedEmbeddingBagCollection`.  (DMP and the planner pick one
    sharder per module type, and the planner asks for sharding types without the module, so one
    sharder cannot serve both kinds of FPEBC: a model holding an FPEBC over a plain EBC as well
    keeps TorchRec's sharder and cannot use this one; this sharder raises naming the tables.)
    As for every FPEBC, TorchRec's planner offers row-wise types only under an explicit
    ``ParameterConstraints(sharding_types=[...])``; here they are exact (positions are taken
    before any id leaves its process).

    Example::

        >>> from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
        >>> table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100,
        ...                            feature_names=["f"])
        >>> pq = PQEmbeddingBagCollection([table], {"t": torch.zeros(100, 2, dtype=torch.uint8)},
        ...                               {"t": torch.zeros(2, 16, 4)}, is_weighted=True)
        >>> fpebc = FeatureProcessedEmbeddingBagCollection(
        ...     pq, PositionWeightedModuleCollection({"f": 4}))
        >>> planner = EmbeddingShardingPlanner(Topology(world_size=2, compute_device="cpu"))
        >>> plan = planner.plan(fpebc, [PQFeatureProcessedEmbeddingBagCollectionSharder()])
        >>> plan.plan[""]["t"].sharding_type
        'table_wise'
    """

    def __init__(self) -> None:
        super().__init__()
        self._pq_sharder = PQEmbeddingBagCollectionSharder()

    def shard(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedPQFeatureProcessedEmbeddingBagCollection:
        return ShardedPQFeatureProcessedEmbeddingBagCollection(
            module, params, env, device if device is not None else torch.device("cpu")
        )

    def shardable_parameters(
        self, module: FeatureProcessedEmbeddingBagCollection
    ) -> dict[str, nn.Parameter]:
        return self._pq_sharder.shardable_parameters(_pq_collection_of(module))

    @property
    def module_type(self) -> type[FeatureProcessedEmbeddingBagCollection]:
        return FeatureProcessedEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._pq_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return self._pq_sharder.compute_kernels(sharding_type, compute_device_type)
