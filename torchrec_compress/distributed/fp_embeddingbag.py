"""TorchRec's sharded ``FeatureProcessedEmbeddingBagCollection`` around any collection.

``compress_`` swaps an FPEBC's inner ``EmbeddingBagCollection`` for a compressed collection
(low-rank, composite low-rank, row-wise quantized); TorchRec's FPEBC sharder would then ask it
for ``embedding_bags``.  :class:`FeatureProcessedCollectionSharder` sizes and shards the inner
collection with the sharder of its type (the ``by_type`` table of a
:class:`~torchrec_compress.registry.SharderContext`, which each method fills; plain EBCs with the
EBC sharder) into :class:`ShardedFeatureProcessedCollection`.  A method whose collections need a
different FPEBC sharder altogether (product quantization pools where the batch was asked for)
offers its own through ``SharderContext.feature_processed``.

A sharded compressed collection takes part through three optional attributes (duck-typed, so
this module names no method):

* ``process_features`` (settable): the enclosing FPEBC's feature processors, for collections
  that need the processed weights of the local batch (a low-rank mean's coefficients); such a
  collection also names its own ``sharded_parameter_names``;
* ``pools_locally``: whether the collection pools every bag on the process that asked for it,
  from rows sent back; the processors then run on the local batch just before pooling, through
  its ``process_local_features(ctx, processors, is_collection)``.

A collection sharder may refuse a collection inside an FPEBC with ``check_feature_processed``.

Example::

    >>> sharder = FeatureProcessedCollectionSharder()
    >>> sharder.module_type.__name__
    'FeatureProcessedEmbeddingBagCollection'
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding_types import KJTList
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
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.distributed.embeddingbag import CPURowWiseEmbeddingBagCollectionSharder
from torchrec_compress.distributed.in_backward import in_backward_group, step_in_backward
from torchrec_compress.registry import SharderContext, method_sharders


class ShardedFeatureProcessedCollection(ShardedFeatureProcessedEmbeddingBagCollection):
    """TorchRec's sharded FPEBC, around a plain or a compressed collection.

    The feature processors run on the distributed ids as in TorchRec, and on the local batch too
    for a collection with ``process_features``; a collection that ``pools_locally`` gets them
    applied to the local batch just before pooling.

    Three things differ from TorchRec's own sharded FPEBC, whatever the collection:

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
        ebc_sharder (ModuleSharder[nn.Module]): shards its collection.
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
            module, table_name_to_parameter_sharding, ebc_sharder, env, device, module_fqn
        )
        collection = self._embedding_bag_collection
        self._own_names: bool = hasattr(collection, "process_features")
        if self._own_names:
            collection.process_features = self.apply_feature_processors_to_kjt_list
        self._pools_locally: bool = bool(getattr(collection, "pools_locally", False))
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
            features = unweighted_copy(features)
        return super().input_dist(ctx, features)

    def preprocess_input(
        self, args: list[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], Mapping[str, Any]]:
        """What ``TrainPipelineSparseDist`` calls before the input dist: TorchRec's writes the
        bags' positions into the batch's own KJT (row-wise); this one into a copy, and not at
        all when the bags are processed where they are pooled."""
        if self._pools_locally or not self._row_wise_sharded:
            return args, kwargs
        copies = [unweighted_copy(a) if isinstance(a, KeyedJaggedTensor) else a for a in args]
        named = {
            k: unweighted_copy(v) if isinstance(v, KeyedJaggedTensor) else v
            for k, v in kwargs.items()
        }
        return super().preprocess_input(copies, named)

    def compute(self, ctx: Any, dist_input: KJTList) -> Any:
        if self._pools_locally:
            return self._embedding_bag_collection.compute(ctx, dist_input)
        return super().compute(ctx, dist_input)

    def output_dist(self, ctx: Any, output: Any) -> LazyAwaitable[KeyedTensor]:
        if self._pools_locally:
            self._embedding_bag_collection.process_local_features(
                ctx, self._feature_processors, self._is_collection
            )
        return super().output_dist(ctx, output)

    def compute_and_output_dist(self, ctx: Any, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        if not self._pools_locally:
            return super().compute_and_output_dist(ctx, input)
        return self.output_dist(ctx, self.compute(ctx, input))

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        if self._own_names:
            yield from self._embedding_bag_collection.sharded_parameter_names(
                append_prefix(prefix, "_embedding_bag_collection")
            )
        else:
            yield from super().sharded_parameter_names(prefix)
        for name in self._in_backward:
            yield append_prefix(prefix, f"_feature_processors.{name}")


def unweighted_copy(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A KJT over the same ids and lengths, without weights (TorchRec's row-wise feature
    processing writes the bags' positions into an input's weights)."""
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        lengths=features.lengths(),
        offsets=features.offsets(),
        stride=features.stride(),
    )


class FeatureProcessedCollectionSharder(FeatureProcessedEmbeddingBagCollectionSharder):
    """TorchRec's FPEBC sharder, also for FPEBCs whose collection was compressed.

    Each FPEBC's collection is sized and sharded by the sharder of its type in
    ``context.by_type`` (plain EBCs by the EBC sharder).  The planner asks a sharder for its
    sharding types once per module type: given ``offered``, the sharder of the collections of
    the model's FPEBCs, it is offered that sharder's types and kernels (and shards only FPEBCs
    over that ``kind``, plain or others without an FPEBC sharder of their own); without,
    TorchRec's, less what the EBC sharder does not offer.

    Args:
        ebc_sharder (Optional[EmbeddingBagCollectionSharder]): shards plain EBCs; defaults to
            the project's row-wise-on-CPU EBC sharder (or ``context.ebc_sharder``).
        qcomm_codecs_registry (Optional[dict[str, QuantizedCommCodecs]]): as for TorchRec's.
        context (Optional[SharderContext]): the sharders of the compressed collections; by
            default every registered method's.
        kind (Optional[type[nn.Module]]): the collection type ``offered`` shards.
        offered (Optional[ModuleSharder[nn.Module]]): whose types and kernels the planner sees.

    Example::

        >>> FeatureProcessedCollectionSharder().sharding_types("cpu")[:2]
        ['data_parallel', 'table_wise']
    """

    def __init__(
        self,
        ebc_sharder: ModuleSharder[Any] | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        *,
        context: SharderContext | None = None,
        kind: type[nn.Module] | None = None,
        offered: ModuleSharder[Any] | None = None,
    ) -> None:
        ebc_sharder = ebc_sharder or (context.ebc_sharder if context is not None else None)
        ebc_sharder = ebc_sharder or CPURowWiseEmbeddingBagCollectionSharder(
            qcomm_codecs_registry=qcomm_codecs_registry
        )
        super().__init__(ebc_sharder, qcomm_codecs_registry)
        if context is None:
            context = SharderContext(model=None, ebc_sharder=ebc_sharder)
            method_sharders(context)
        self._context = context
        self._kind = kind
        self._offered = offered

    def _collection_sharder(
        self, module: FeatureProcessedEmbeddingBagCollection
    ) -> ModuleSharder[Any] | None:
        """The sharder of the FPEBC's compressed collection; ``None`` for a plain EBC."""
        collection = module._embedding_bag_collection
        kind = type(collection)
        sharder = self._context.by_type.get(kind)
        if sharder is None and isinstance(collection, EmbeddingBagCollection):
            return None
        if sharder is None or (kind in self._context.feature_processed and kind is not self._kind):
            tables = [t.name for t in collection.embedding_bag_configs()]
            raise ValueError(
                f"a FeatureProcessedEmbeddingBagCollection holds a {kind.__name__} "
                f"(tables {tables}): build the sharders with torchrec_compress.sharders(model), "
                "which picks the sharder for the model's FPEBCs (for product-quantized ones "
                "PQFeatureProcessedEmbeddingBagCollectionSharder)"
            )
        return sharder

    def shard(
        self,
        module: FeatureProcessedEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedFeatureProcessedEmbeddingBagCollection:
        sharder = self._collection_sharder(module)
        check = getattr(sharder, "check_feature_processed", None)
        if check is not None:
            check(module._embedding_bag_collection)
        return ShardedFeatureProcessedCollection(
            module,
            params,
            ebc_sharder=sharder if sharder is not None else self._ebc_sharder,
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
        if self._offered is not None:
            return self._offered.sharding_types(compute_device_type)
        # TorchRec's, less what the EBC sharder does not offer (data_parallel, for tables with
        # in-backward optimizers)
        offered = set(self._ebc_sharder.sharding_types(compute_device_type))
        return [t for t in super().sharding_types(compute_device_type) if t in offered]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if self._offered is not None:
            return self._offered.compute_kernels(sharding_type, compute_device_type)
        return super().compute_kernels(sharding_type, compute_device_type)
