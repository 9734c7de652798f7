"""Row-wise int8 / int4 / int2 / fp16 as one registered
:class:`~torchrec_compress.registry.CompressionMethod`.

Config :class:`RowWiseQuantConfig`; modules TorchRec's quantized ``EmbeddingBagCollection`` (or
an ``EmbeddingBagCollection`` of fp16 rows).  Layout kind ``rowwise_quant``: ``data_types``
(table -> TorchRec ``DataType`` value) and ``kept`` (tables left FP32).

Example::

    >>> from torchrec_compress.registry import method_of
    >>> type(method_of(RowWiseQuantConfig(bits=8))).__name__
    'RowWiseQuantMethod'
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn
from torchrec.distributed.types import ModuleSharder
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.distributed.fp_embeddingbag import FeatureProcessedCollectionSharder
from torchrec_compress.layout import check_collection, check_table_names
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.methods.rowwise_quant.local import plan_rowwise
from torchrec_compress.methods.rowwise_quant.quantize import (
    RowWiseQuantHandler,
    empty_rowwise_collection,
)
from torchrec_compress.methods.rowwise_quant.sharded import (
    ReplicatedCollectionSharder,
    ShardedReplicatedCollection,
)
from torchrec_compress.methods.rowwise_quant.sharded_driver import sharded_rowwise_state
from torchrec_compress.registry import (
    CompressionMethod,
    ConversionPlan,
    FilterFn,
    LayoutBuilder,
    ShardedCompression,
    SharderContext,
)


class RowWiseQuantMethod(CompressionMethod):
    """Each row stored in fewer bits: fbgemm's n-bit rows (frozen) or fp16 (trainable)."""

    config_types = (RowWiseQuantConfig,)
    module_types = (QuantEmbeddingBagCollection,)
    collection_types = (QuantEmbeddingBagCollection,)
    layout_kinds = ("rowwise_quant",)

    def handler(self, config: CompressionConfig) -> RowWiseQuantHandler:
        assert isinstance(config, RowWiseQuantConfig)
        return RowWiseQuantHandler(config)

    def plan(
        self,
        model: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        filter_fn: FilterFn | None,
        forward_fn: ForwardFn,
    ) -> ConversionPlan:
        return plan_rowwise(model, config, calibration, filter_fn, forward_fn)

    def compress_sharded(
        self,
        model: nn.Module,
        skeleton: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        forward_fn: ForwardFn,
        filter_fn: FilterFn | None,
    ) -> ShardedCompression:
        assert isinstance(config, RowWiseQuantConfig)
        return ShardedCompression(
            *sharded_rowwise_state(model, skeleton, config, calibration, forward_fn, filter_fn)
        )

    def sharders(self, context: SharderContext) -> list[ModuleSharder[Any]]:
        """None of its own at the top of a model (DMP keeps a quantized collection whole on every
        process, see ``training_sharders``); the replicated sharder for quantized factor
        collections and for those inside an FPEBC."""
        replicated = ReplicatedCollectionSharder()
        context.by_type[QuantEmbeddingBagCollection] = replicated
        context.feature_processed[QuantEmbeddingBagCollection] = FeatureProcessedCollectionSharder(
            context=context, kind=QuantEmbeddingBagCollection, offered=replicated
        )
        return []

    def skeleton(
        self, module: nn.Module, fqn: str, skeleton_of: Callable[[nn.Module, str], nn.Module]
    ) -> nn.Module | None:
        if isinstance(module, ShardedReplicatedCollection):
            return copy.deepcopy(module.collection)
        return None

    def describe(
        self, module: nn.Module, describe: Callable[[nn.Module], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        if not isinstance(module, (QuantEmbeddingBagCollection, EmbeddingBagCollection)):
            return None
        types = {t.name: t.data_type.value for t in module.embedding_bag_configs()}
        if isinstance(module, EmbeddingBagCollection) and set(types.values()) <= {"FP32"}:
            return None
        return {
            "kind": "rowwise_quant",
            "data_types": types,
            "kept": [name for name, value in types.items() if value == "FP32"],
        }

    def restore(
        self, current: nn.Module, entry: Mapping[str, Any], path: str, build: LayoutBuilder
    ) -> nn.Module:
        """fp16 rows (trainable, on ``build.device``) or TorchRec's quantized collection, built
        on ``build.quantized_device`` (see :func:`empty_rowwise_collection`)."""
        ebc = check_collection(current, entry, path)
        tables = ebc.embedding_bag_configs()
        names = entry["data_types"]
        check_table_names(tables, names, f"layout of {path!r} (data_types)")
        try:
            types = {t.name: DataType(names.get(t.name, t.data_type.value)) for t in tables}
        except ValueError as e:
            raise ValueError(f"layout of {path!r}: {e}") from e
        return empty_rowwise_collection(
            tables, ebc.is_weighted(), types, build.device, build.quantized_device
        )
