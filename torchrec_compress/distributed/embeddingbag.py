"""TorchRec's sharded ``EmbeddingBagCollection`` that refuses out-of-range ids, and its sharder,
which also offers row-wise sharding on CPU.

TorchRec's ``EmbeddingBagCollectionSharder.sharding_types("cpu")`` leaves out ``row_wise``,
``table_row_wise`` and ``grid_shard`` because gloo has no asynchronous reduce-scatter.  The
synchronous path works on gloo and matches an unsharded reference exactly (see
``tests/distributed/test_dmp_equivalence.py``), and row-wise sharding is what billion-row tables
need, so this sharder offers the CUDA list on every device.

fbgemm's default bounds check replaces an id outside its table by 0 (one log line, and training
goes on); the sharded collection here checks the ids of every batch before they are distributed
(:class:`~torchrec_compress.guards.FeatureIdRanges`, one vectorised pass over the ids) and
raises naming the table, the feature and the id.  The low-rank and feature-processed sharders
build their inner collection with this sharder, so they refuse such ids too.
"""

from typing import Any

import torch
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import Awaitable, ParameterSharding, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.guards import FeatureIdRanges


class BoundsCheckedShardedEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """TorchRec's ``ShardedEmbeddingBagCollection``, raising on an id outside its table.

    Built by :class:`CPURowWiseEmbeddingBagCollectionSharder`; same arguments as TorchRec's.

    Example::

        >>> # under DMP with torchrec_compress.distributed.default_sharders():
        >>> # dmp(batch) raises IndexError("table 't_f0', feature 'f0': id 10000 is outside ...")
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._id_ranges = FeatureIdRanges(self._embedding_bag_configs)

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if isinstance(features, KeyedJaggedTensor):
            self._id_ranges.check(features)
        return super().input_dist(ctx, features)


class CPURowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that offers the CUDA sharding types on CPU too and
    shards into :class:`BoundsCheckedShardedEmbeddingBagCollection`.

    Example::

        >>> from torchrec.distributed.types import ShardingType
        >>> sharder = CPURowWiseEmbeddingBagCollectionSharder()
        >>> ShardingType.ROW_WISE.value in sharder.sharding_types("cpu")
        True
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu":
            return super().sharding_types("cuda")
        return super().sharding_types(compute_device_type)

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedEmbeddingBagCollection:
        return BoundsCheckedShardedEmbeddingBagCollection(
            module=module,
            table_name_to_parameter_sharding=params,
            env=env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
            sharded_module_order_overwrite=self._sharded_module_order_overwrite,
        )
