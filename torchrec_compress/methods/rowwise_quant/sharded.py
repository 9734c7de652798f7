"""A frozen collection kept whole on every process, as a TorchRec sharded module.

TorchRec's quantized ``EmbeddingBagCollection`` (row-wise int8 / int4 rows, ``torchrec.quant``)
has no training sharder on CPU: its sharder builds TorchRec's inference module, which asserts
CUDA.  On its own such a collection needs none: DMP leaves it whole on every process, it holds
no parameter, and every process pools its own batch.  Inside a low-rank collection (AFM, then
int8 of the factor tables) it must be a sharded module all the same, because the low-rank
collection's trained projections and means are replicas kept out of DDP by its sharded module
(DDP's in-backward optimizer path needs an accelerator).  :class:`ReplicatedCollectionSharder`
offers it to the planner as ``data_parallel`` at its true size (``uint8`` rows plus fp16 scale
and bias) and :class:`ShardedReplicatedCollection` runs it locally: nothing is distributed.
"""

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    EmbeddingComputeKernel,
    KJTList,
)
from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    LazyNoWait,
    NoWait,
    NullShardedModuleContext,
    ParameterSharding,
    ShardedModule,
    ShardingEnv,
    ShardingType,
)
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class ShardedReplicatedCollection(
    ShardedModule[KJTList, KeyedTensor, KeyedTensor, NullShardedModuleContext]
):
    """A collection run whole on every process (no input or output distribution).

    Its state dict is the collection's own (same keys): the collection's children are
    registered here, the collection itself is kept for its forward.

    Args:
        module (nn.Module): the collection (e.g. TorchRec's quantized
            ``EmbeddingBagCollection``), already on its device.

    Example::

        >>> # built by ReplicatedCollectionSharder through DMP; see
        >>> # tests/distributed/test_matrix.py (AFM then int8, 2 processes)
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, child)
        self._collection = [module]  # not a submodule: its children are registered above
        self._lookups: list[nn.Module] = []  # nothing for TorchRec's pipelines to prefetch

    @property
    def collection(self) -> nn.Module:
        """The collection this module runs."""
        return self._collection[0]

    @property
    def unsharded_module_type(self) -> type[nn.Module]:
        return type(self.collection)

    def embedding_bag_configs(self) -> Any:
        return self.collection.embedding_bag_configs()  # type: ignore[operator]

    def create_context(self) -> NullShardedModuleContext:
        return NullShardedModuleContext()

    def input_dist(
        self, ctx: NullShardedModuleContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        # TorchRec's form of an input dist, so that TrainPipelineSparseDist can fuse it
        local: Awaitable[Awaitable[KeyedJaggedTensor]] = NoWait(NoWait(features))
        return KJTListSplitsAwaitable([local], ctx)

    def compute(self, ctx: NullShardedModuleContext, dist_input: KJTList) -> KeyedTensor:
        out = self.collection(dist_input[0])
        assert isinstance(out, KeyedTensor)
        return out

    def output_dist(
        self, ctx: NullShardedModuleContext, output: KeyedTensor
    ) -> LazyAwaitable[KeyedTensor]:
        return LazyNoWait(output)

    def compute_and_output_dist(
        self, ctx: NullShardedModuleContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # frozen rows are buffers; a parameter of the collection would be DDP's to synchronise
        yield from ()


class ReplicatedCollectionSharder(BaseEmbeddingSharder[QuantEmbeddingBagCollection]):
    """Plans TorchRec's quantized ``EmbeddingBagCollection`` at its true size and, on CPU, runs
    it whole on every process.

    On CPU it offers ``data_parallel`` only (one whole copy per process, sized by its ``uint8``
    rows with their fp16 scale and bias) and shards into :class:`ShardedReplicatedCollection`.
    On an accelerator (e.g. planning the serving footprint of a GPU cluster) it offers what
    TorchRec's inference sharder of quantized collections offers, and shards with it.

    Example::

        >>> ReplicatedCollectionSharder().sharding_types("cpu")
        ['data_parallel']
        >>> "row_wise" in ReplicatedCollectionSharder().sharding_types("cuda")
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self._inference = QuantEmbeddingBagCollectionSharder()

    def shard(
        self,
        module: QuantEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedModule[Any, Any, Any, Any]:
        if device is not None and device.type != "cpu":
            return self._inference.shard(module, params, env, device)
        wrong = sorted(n for n, p in params.items() if p.sharding_type != _DATA_PARALLEL)
        if wrong:
            raise ValueError(
                f"tables {wrong} of a row-wise quantized collection are planned "
                f"{sorted({params[n].sharding_type for n in wrong})}: on CPU its frozen rows are "
                "kept whole on every process (data_parallel); plan with "
                "torchrec_compress.sharders(model), which offers the planner only that"
            )
        return ShardedReplicatedCollection(module)

    def shardable_parameters(self, module: QuantEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        # the planner sizes each table from this tensor: its uint8 rows with their fp16 scale
        # and bias (d + 4 bytes a row in int8)
        state = module.state_dict()
        out: dict[str, nn.Parameter] = {}
        for name, value in state.items():
            if not name.endswith(".weight"):
                continue
            parts = [value] + [state[name + s] for s in ("_qscale", "_qbias") if name + s in state]
            rows = torch.cat([t.contiguous().view(torch.uint8).flatten(1) for t in parts], dim=1)
            out[name.split(".")[-2]] = nn.Parameter(rows, requires_grad=False)
        return out

    @property
    def module_type(self) -> type[QuantEmbeddingBagCollection]:
        return QuantEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu":
            return [_DATA_PARALLEL]
        return self._inference.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu":
            return [EmbeddingComputeKernel.DENSE.value]
        return self._inference.compute_kernels(sharding_type, compute_device_type)


_DATA_PARALLEL = ShardingType.DATA_PARALLEL.value
