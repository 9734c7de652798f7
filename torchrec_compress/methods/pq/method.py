"""MEC / PQ as one registered :class:`~torchrec_compress.registry.CompressionMethod`.

Configs :class:`MECConfig` and :class:`PQConfig` (weighted k-means only); module
:class:`PQEmbeddingBagCollection` (``M`` one-byte codes per row, trainable codebooks).  Layout
kind ``pq``: ``tables`` (table -> ``num_subspaces``, ``num_centroids``).

Example::

    >>> from torchrec_compress.registry import method_of
    >>> type(method_of(PQConfig(num_subspaces=2))).__name__, PQMethod.layout_kinds
    ('PQMethod', ('pq',))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.layout import check_collection, check_table_names
from torchrec_compress.methods.pq.config import MECConfig, PQConfig
from torchrec_compress.methods.pq.handler import PQHandler
from torchrec_compress.methods.pq.local import plan_mec
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.quantizer import code_dtype
from torchrec_compress.methods.pq.sharded import (
    PQEmbeddingBagCollectionSharder,
    ShardedPQEmbeddingBagCollection,
)
from torchrec_compress.methods.pq.sharded_driver import sharded_pq_state
from torchrec_compress.methods.pq.sharded_fp import PQFeatureProcessedEmbeddingBagCollectionSharder
from torchrec_compress.registry import (
    CompressionMethod,
    ConversionPlan,
    FilterFn,
    LayoutBuilder,
    ShardedCompression,
    SharderContext,
)
from torchrec_compress.skeleton import META


def _mec(config: CompressionConfig) -> MECConfig:
    """A :class:`PQConfig` is MEC's weighted k-means branch."""
    if isinstance(config, PQConfig):
        return config.to_mec_config()
    assert isinstance(config, MECConfig)
    return config


class PQMethod(CompressionMethod):
    """MEC (popularity-weighted, contrastive) and plain PQ (weighted k-means) codes."""

    config_types = (MECConfig, PQConfig)
    module_types = (PQEmbeddingBagCollection,)
    collection_types = (PQEmbeddingBagCollection,)
    placed_types = (PQEmbeddingBagCollection,)
    layout_kinds = ("pq",)

    def handler(self, config: CompressionConfig) -> PQHandler:
        return PQHandler(_mec(config))

    def plan(
        self,
        model: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        filter_fn: FilterFn | None,
        forward_fn: ForwardFn,
    ) -> ConversionPlan:
        return plan_mec(model, _mec(config), calibration, filter_fn, forward_fn)

    def compress_sharded(
        self,
        model: nn.Module,
        skeleton: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        forward_fn: ForwardFn,
        filter_fn: FilterFn | None,
    ) -> ShardedCompression:
        return ShardedCompression(
            *sharded_pq_state(model, skeleton, _mec(config), calibration, forward_fn, filter_fn)
        )

    def sharders(self, context: SharderContext) -> list[ModuleSharder[Any]]:
        """The PQ sharder, and its own FPEBC sharder (bags pooled where they were asked for)."""
        sharder = PQEmbeddingBagCollectionSharder()
        context.by_type[PQEmbeddingBagCollection] = sharder
        context.feature_processed[PQEmbeddingBagCollection] = (
            PQFeatureProcessedEmbeddingBagCollectionSharder()
        )
        return [sharder]

    def skeleton(
        self, module: nn.Module, fqn: str, skeleton_of: Callable[[nn.Module, str], nn.Module]
    ) -> nn.Module | None:
        if not isinstance(module, ShardedPQEmbeddingBagCollection):
            return None
        configs = module.embedding_bag_configs()
        codes = {
            t.name: torch.empty(t.num_embeddings, local.shape[1], dtype=local.dtype, device=META)
            for t in configs
            for local in [getattr(module.codes, t.name)]
        }
        books = {n: torch.empty_like(module._codebook(n), device=META) for n in module.codebooks}
        return PQEmbeddingBagCollection(configs, codes, books, module.is_weighted())

    def describe(
        self, module: nn.Module, describe: Callable[[nn.Module], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        if not isinstance(module, PQEmbeddingBagCollection):
            return None
        return {
            "kind": "pq",
            "tables": {
                name: {"num_subspaces": int(b.shape[0]), "num_centroids": int(b.shape[1])}
                for name in module.codebooks
                for b in [module.codebook(name)]
            },
        }

    def restore(
        self, current: nn.Module, entry: Mapping[str, Any], path: str, build: LayoutBuilder
    ) -> nn.Module:
        ebc = check_collection(current, entry, path)
        tables = ebc.embedding_bag_configs()
        specs = entry["tables"]
        check_table_names(tables, specs, f"layout of {path!r} (pq tables)")
        missing = sorted({t.name for t in tables} - set(specs))
        if missing:
            raise ValueError(f"layout of {path!r} (pq tables) lacks table(s) {missing}")
        codes, books = {}, {}
        for t in tables:
            m, k = int(specs[t.name]["num_subspaces"]), int(specs[t.name]["num_centroids"])
            if t.embedding_dim % m != 0:
                raise ValueError(
                    f"layout of {path!r}: table {t.name!r} of dim {t.embedding_dim} cannot have "
                    f"num_subspaces={m}"
                )
            codes[t.name] = torch.zeros(
                t.num_embeddings, m, dtype=code_dtype(k), device=build.device
            )
            books[t.name] = torch.empty(m, k, t.embedding_dim // m, device=build.device)
        return PQEmbeddingBagCollection(tables, codes, books, ebc.is_weighted())
