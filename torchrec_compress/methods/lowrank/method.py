"""AFM / SVD as one registered :class:`~torchrec_compress.registry.CompressionMethod`.

Configs :class:`AFMConfig` and :class:`SVDConfig`; modules :class:`LowRankEmbeddingBagCollection`
(and its composite form, whose factor tables another method compressed) and
:class:`LowRankLinear`.  Layout kinds:

* ``lowrank`` / ``composite``: ``ranks`` (table -> k), ``kept`` (tables left whole) and
  ``factors`` (the entry of the factor collection when another method compressed it);
* ``lowrank_linear``: ``rank``.

Example::

    >>> from torchrec_compress.registry import method_of
    >>> method = method_of(AFMConfig(rank=4))
    >>> method.describe(LowRankLinear(8, 2, 4), lambda m: None)
    {'kind': 'lowrank_linear', 'rank': 2}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import ModuleSharder

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.distributed.fp_embeddingbag import FeatureProcessedCollectionSharder
from torchrec_compress.layout import check_collection, check_table_names
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankConfig, SVDConfig
from torchrec_compress.methods.lowrank.handler import LowRankHandler
from torchrec_compress.methods.lowrank.linear import LowRankLinear
from torchrec_compress.methods.lowrank.local import plan_lowrank
from torchrec_compress.methods.lowrank.module import (
    CompositeLowRankEmbeddingBagCollection,
    LowRankEmbeddingBagCollection,
)
from torchrec_compress.methods.lowrank.sharded import (
    CompositeLowRankSharder,
    LowRankEmbeddingBagCollectionSharder,
    ShardedLowRankEmbeddingBagCollection,
)
from torchrec_compress.methods.lowrank.sharded_driver import sharded_lowrank_state
from torchrec_compress.registry import (
    CompressionMethod,
    ConversionPlan,
    FilterFn,
    LayoutBuilder,
    ShardedCompression,
    SharderContext,
)
from torchrec_compress.skeleton import META


class LowRankMethod(CompressionMethod):
    """AFM (PCA of what each table / layer outputs) and SVD (of the weights)."""

    config_types = (AFMConfig, SVDConfig)
    module_types = (LowRankEmbeddingBagCollection, LowRankLinear)
    collection_types = (LowRankEmbeddingBagCollection,)
    layout_kinds = ("lowrank", "composite", "lowrank_linear")

    def handler(self, config: CompressionConfig) -> LowRankHandler:
        assert isinstance(config, LowRankConfig)
        return LowRankHandler(config)

    def plan(
        self,
        model: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        filter_fn: FilterFn | None,
        forward_fn: ForwardFn,
    ) -> ConversionPlan:
        return plan_lowrank(model, config, calibration, filter_fn, forward_fn)

    def compress_sharded(
        self,
        model: nn.Module,
        skeleton: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        forward_fn: ForwardFn,
        filter_fn: FilterFn | None,
    ) -> ShardedCompression:
        assert isinstance(config, LowRankConfig)
        return ShardedCompression(
            *sharded_lowrank_state(model, skeleton, config, calibration, forward_fn, filter_fn)
        )

    def sharders(self, context: SharderContext) -> list[ModuleSharder[Any]]:
        """The low-rank and composite sharders; the FPEBC sharder for composite collections.

        Composite collections are offered the sharding types of their factor collections'
        sharder (one kind per model, from ``context.model``; by default the first other
        method's: product quantization).
        """
        factor_kind = _composite_factor_kind(context.model) if context.model else None
        lowrank = LowRankEmbeddingBagCollectionSharder(context.ebc_sharder)
        composite = CompositeLowRankSharder(context.by_type, factor_kind)
        context.by_type[LowRankEmbeddingBagCollection] = lowrank
        context.by_type[CompositeLowRankEmbeddingBagCollection] = composite
        context.feature_processed[CompositeLowRankEmbeddingBagCollection] = (
            FeatureProcessedCollectionSharder(
                context=context, kind=CompositeLowRankEmbeddingBagCollection, offered=composite
            )
        )
        return [lowrank, composite]

    def skeleton(
        self, module: nn.Module, fqn: str, skeleton_of: Callable[[nn.Module, str], nn.Module]
    ) -> nn.Module | None:
        if not isinstance(module, ShardedLowRankEmbeddingBagCollection):
            return None
        ranks = {name: int(p.shape[0]) for name, p in module.projection.items()}
        lowrank = LowRankEmbeddingBagCollection(
            module.embedding_bag_configs(), ranks, module.is_weighted(), META
        )
        if isinstance(module.factor_ebc, ShardedEmbeddingBagCollection):
            return lowrank
        # factor tables compressed again (AFM, then MEC/PQ or int8): a composite collection
        return lowrank.with_factor_collection(skeleton_of(module.factor_ebc, f"{fqn}.factor_ebc"))

    def describe(
        self, module: nn.Module, describe: Callable[[nn.Module], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        if isinstance(module, LowRankLinear):
            return {"kind": "lowrank_linear", "rank": module.rank}
        if not isinstance(module, LowRankEmbeddingBagCollection):
            return None
        composite = isinstance(module, CompositeLowRankEmbeddingBagCollection)
        ranks = module.ranks()
        return {
            "kind": "composite" if composite else "lowrank",
            "ranks": ranks,
            "kept": [t.name for t in module.embedding_bag_configs() if t.name not in ranks],
            "factors": describe(module.factor_ebc),
        }

    def restore(
        self, current: nn.Module, entry: Mapping[str, Any], path: str, build: LayoutBuilder
    ) -> nn.Module:
        if entry["kind"] == "lowrank_linear":
            if type(current) is not nn.Linear:
                raise ValueError(
                    f"layout of {path!r}: a lowrank_linear replaces an nn.Linear, found "
                    f"{type(current).__name__}"
                )
            return LowRankLinear(
                current.in_features,
                int(entry["rank"]),
                current.out_features,
                current.bias is not None,
                build.device,
            )
        ebc = check_collection(current, entry, path)
        tables = ebc.embedding_bag_configs()
        ranks = {str(n): int(k) for n, k in entry["ranks"].items()}
        check_table_names(tables, ranks, f"layout of {path!r} (ranks)")
        module = LowRankEmbeddingBagCollection(tables, ranks, ebc.is_weighted(), build.device)
        factors = entry.get("factors")
        if factors is None:
            return module
        inner = build.collection(module.factor_ebc, factors, f"{path}.factor_ebc")
        return module.with_factor_collection(inner)


def _composite_factor_kind(model: nn.Module) -> type[nn.Module] | None:
    """The type of the factor collections of the model's composite low-rank collections (one
    kind per model: DMP takes one sharder per module type)."""
    kinds = {
        fqn or "<model>": type(m.factor_ebc)
        for fqn, m in model.named_modules()
        if isinstance(m, CompositeLowRankEmbeddingBagCollection)
    }
    if len(set(kinds.values())) > 1:
        raise ValueError(
            "one sharder per module type: the low-rank collections "
            + ", ".join(f"{k} (factors: {v.__name__})" for k, v in sorted(kinds.items()))
            + " compress their factor tables differently and cannot be sharded in one model; "
            "compress all of them alike"
        )
    return next(iter(kinds.values()), None)
