"""TorchRec's sharded ``EmbeddingBagCollection`` that refuses out-of-range ids and mean-pools
correctly on every plan, and its sharder, which also offers row-wise sharding on CPU.

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

Mean pooling.  Row-wise and table-row-wise shards pool a MEAN table by SUM (each shard holds part
of a bag) and TorchRec divides the reduced sum by the bag lengths afterwards.  TorchRec 1.8 builds
that divisor for every output of the collection and resets it to 1 only for row-wise SUM
features, so once one MEAN table is sharded row-wise, every table sharded any other way (table-,
column-, data-parallel), SUM or MEAN, is divided by its bag lengths as well: a silently wrong
pooled output (``tests/distributed/test_mean_pooling.py``).  The collection here builds the
divisor per output key instead: the bag length where the key's table is MEAN and sharded
row-wise or table-row-wise, 1 everywhere else.  Grid sharding pools each row block of a MEAN
table as a MEAN and would add the blocks' means: it is refused for MEAN tables.

In-backward optimizers.  TorchRec shards a data-parallel table into a dense kernel whose
weights no longer carry the optimizers ``apply_optimizer_in_backward`` attached: the table then
trains with whatever dense optimizer the user steps (or not at all), silently.  A table with
in-backward optimizers is therefore not offered data-parallel sharding
(``torchrec_compress.sharders(model)`` builds this sharder with ``data_parallel=False`` for
such models), and a plan that makes it data-parallel anyway is refused, naming it.
"""

from typing import Any

import torch
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import Awaitable, ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.guards import FeatureIdRanges


class BoundsCheckedShardedEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """TorchRec's ``ShardedEmbeddingBagCollection``, raising on an id outside its table.

    Built by :class:`CPURowWiseEmbeddingBagCollectionSharder`; same arguments as TorchRec's.

    Example::

        >>> # under DMP with torchrec_compress.distributed.planning.default_sharders():
        >>> # dmp(batch) raises IndexError("table 't_f0', feature 'f0': id 10000 is outside ...")
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_data_parallel_in_backward(
            kwargs.get("module", args[0] if args else None),
            kwargs.get("table_name_to_parameter_sharding", args[1] if len(args) > 1 else {}),
        )
        super().__init__(*args, **kwargs)
        self._id_ranges = FeatureIdRanges(self._embedding_bag_configs)
        self._mean_divisor = MeanPoolingDivisor(
            self._embedding_bag_configs,
            [
                (sharding_type, sharding.embedding_names(), sharding.embedding_dims())
                for sharding_type, sharding in zip(
                    self._sharding_types, self._embedding_shardings, strict=True
                )
            ],
        )

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if isinstance(features, KeyedJaggedTensor):
            self._id_ranges.check(features)
        awaitable = super().input_dist(ctx, features)
        if self._has_mean_pooling_callback:
            # TorchRec's divisor also divides the outputs of tables not sharded row-wise
            ctx.divisor = self._mean_divisor(features, ctx.inverse_indices)
        return awaitable


def has_in_backward_optimizers(module: EmbeddingBagCollection) -> bool:
    """Whether any table of ``module`` has optimizers attached by ``apply_optimizer_in_backward``."""
    return any(
        hasattr(bag.weight, "_in_backward_optimizers") for bag in module.embedding_bags.values()
    )


def _refuse_data_parallel_in_backward(
    module: EmbeddingBagCollection | None, params: dict[str, ParameterSharding]
) -> None:
    if module is None:
        return
    lost = sorted(
        name
        for name, sharding in params.items()
        if sharding.sharding_type == ShardingType.DATA_PARALLEL.value
        and hasattr(module.embedding_bags[name].weight, "_in_backward_optimizers")
    )
    if lost:
        raise ValueError(
            f"tables {lost} are planned data_parallel but carry in-backward optimizers "
            "(apply_optimizer_in_backward): TorchRec's data-parallel kernel would drop them and "
            "train the tables with the dense optimizer; plan with torchrec_compress.sharders(model) "
            "(which does not offer data_parallel for them) or constrain them to another sharding type"
        )


class MeanPoolingDivisor:
    """The divisor of a sharded collection's pooled output: per output key, the bag lengths
    (weight sums for weighted features) where its table is MEAN-pooled and sharded row-wise or
    table-row-wise (those shards pool by SUM), 1 everywhere else.

    Args:
        configs: the collection's tables.
        shardings: per sharding of the collection, in output order: its sharding type, the
            output keys it produces (``feature`` or ``feature@table`` for shared features) and
            their widths.

    Raises:
        ValueError: a MEAN table is grid-sharded (each row block would be mean-pooled and the
            blocks' means added).

    Example::

        >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
        >>> tables = [EmbeddingBagConfig(name="t0", embedding_dim=2, num_embeddings=5,
        ...                              feature_names=["f0"], pooling=PoolingType.MEAN),
        ...           EmbeddingBagConfig(name="t1", embedding_dim=1, num_embeddings=5,
        ...                              feature_names=["f1"], pooling=PoolingType.MEAN)]
        >>> divisor = MeanPoolingDivisor(tables, [("row_wise", ["f0"], [2]),
        ...                                       ("table_wise", ["f1"], [1])])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f0", "f1"], values=torch.tensor([0, 1, 2, 3, 4]),
        ...     lengths=torch.tensor([3, 0, 1, 1]))
        >>> divisor(kjt).tolist()
        [[3.0, 3.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(
        self,
        configs: list[EmbeddingBagConfig],
        shardings: list[tuple[str, list[str], list[int]]],
    ) -> None:
        pooling = _pooling_per_output_key(configs)
        divided = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
        self._features: list[str] = []
        self._divide: list[bool] = []
        self._dims: list[int] = []
        for sharding_type, names, dims in shardings:
            for name, dim in zip(names, dims, strict=True):
                mean = pooling[name] == PoolingType.MEAN
                if mean and sharding_type == ShardingType.GRID_SHARD.value:
                    raise ValueError(
                        f"output {name!r}: a MEAN-pooled table cannot be grid-sharded (its row "
                        "blocks would be mean-pooled separately and their means added); shard "
                        "it table-, column-, row- or table-row-wise"
                    )
                self._features.append(name.split("@")[0])
                self._divide.append(mean and sharding_type in divided)
                self._dims.append(dim)

    def __call__(
        self,
        features: KeyedJaggedTensor,
        inverse_indices: tuple[list[str], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The ``[batch, sum of output widths]`` divisor for ``features`` (unpermuted input).

        Variable-batch inputs (``inverse_indices`` given) are expanded to the full batch as
        the output is.
        """
        lengths = features.lengths()
        weights = features.weights_or_none()
        if weights is not None:
            lengths = torch.ops.fbgemm.segment_sum_csr(1, features.offsets().int(), weights)
        keys = features.keys()
        if inverse_indices is not None:
            # one row of lengths per key, gathered to the full batch by the inverse indices
            inverse_keys = {key: i for i, key in enumerate(inverse_indices[0])}
            order = torch.tensor([inverse_keys[key] for key in keys], device=lengths.device)
            starts = torch.tensor([0, *features.stride_per_key()], device=lengths.device).cumsum(0)[
                :-1
            ]
            per_key = lengths[inverse_indices[1].index_select(0, order) + starts.unsqueeze(1)]
        else:
            per_key = lengths.view(len(keys), -1)
        index = {key: i for i, key in enumerate(keys)}
        rows = per_key.index_select(
            0, torch.tensor([index[f] for f in self._features], device=lengths.device)
        ).to(torch.float32)
        divide = torch.tensor(self._divide, device=lengths.device).unsqueeze(1)
        rows = torch.where(divide & (rows != 0), rows, torch.ones_like(rows))
        dims = torch.tensor(self._dims, device=lengths.device)
        return torch.repeat_interleave(rows.t(), dims, dim=1, output_size=sum(self._dims))


def _pooling_per_output_key(configs: list[EmbeddingBagConfig]) -> dict[str, PoolingType]:
    """Pooling of every output key a sharding may name: ``feature@table`` and plain ``feature``
    (the latter only where one table reads the feature)."""
    tables_of: dict[str, list[EmbeddingBagConfig]] = {}
    for config in configs:
        for feature in config.feature_names:
            tables_of.setdefault(feature, []).append(config)
    pooling: dict[str, PoolingType] = {}
    for feature, tables in tables_of.items():
        for config in tables:
            pooling[f"{feature}@{config.name}"] = config.pooling
        if len(tables) == 1:
            pooling[feature] = tables[0].pooling
    return pooling


class CPURowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that offers the CUDA sharding types on CPU too and
    shards into :class:`BoundsCheckedShardedEmbeddingBagCollection`.

    Args:
        *args, **kwargs: as TorchRec's ``EmbeddingBagCollectionSharder``.
        data_parallel (bool): offer ``data_parallel`` (off for models whose tables carry
            in-backward optimizers, which TorchRec's data-parallel kernel drops).

    Example::

        >>> from torchrec.distributed.types import ShardingType
        >>> sharder = CPURowWiseEmbeddingBagCollectionSharder()
        >>> ShardingType.ROW_WISE.value in sharder.sharding_types("cpu")
        True
    """

    def __init__(self, *args: Any, data_parallel: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._data_parallel = data_parallel

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(
            "cuda" if compute_device_type == "cpu" else compute_device_type
        )
        if not self._data_parallel:
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        return types

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
