"""A method from outside the package: one class, one ``register`` call, and ``compress_``,
``method_of`` and the layout reach it; nothing of the library changes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from torchrec_compress import AFMConfig, compress_, compression_layout
from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import FilterFn, find_embedding_bag_collections
from torchrec_compress.registry import (
    CompressionMethod,
    ConversionPlan,
    ShardedCompression,
    method_of,
    register,
    registered_methods,
)
from torchrec_compress.report import ReportRow


@dataclass
class HalfConfig(CompressionConfig):
    """fp16 copies of every table (a toy method)."""


class HalfEmbeddingBagCollection(nn.Module):
    """A collection of fp16 tables, pooled by sum in float32."""

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.tables = nn.ParameterDict(
            {n: nn.Parameter(b.weight.detach().half()) for n, b in ebc.embedding_bags.items()}
        )


class HalfMethod(CompressionMethod):
    config_types = (HalfConfig,)
    module_types = (HalfEmbeddingBagCollection,)
    collection_types = (HalfEmbeddingBagCollection,)
    layout_kinds = ("half",)

    def handler(self, config: CompressionConfig) -> None:
        return None

    def plan(
        self,
        model: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        filter_fn: FilterFn | None,
        forward_fn: ForwardFn,
    ) -> ConversionPlan:
        replacements: dict[str, nn.Module] = {}
        rows = []
        for fqn, ebc in find_embedding_bag_collections(model, filter_fn).items():
            replacements[fqn] = HalfEmbeddingBagCollection(ebc)
            for t in ebc.embedding_bag_configs():
                size = t.num_embeddings * t.embedding_dim
                shape = (t.num_embeddings, t.embedding_dim)
                rows.append(
                    ReportRow(t.name, "table", shape, "HALF", None, 4 * size, 2 * size, None)
                )
        return ConversionPlan(replacements, rows)

    def compress_sharded(self, *args: Any, **kwargs: Any) -> ShardedCompression:
        raise NotImplementedError("HalfMethod has no sharded driver")

    def describe(self, module: nn.Module, describe: Any) -> dict[str, Any] | None:
        if isinstance(module, HalfEmbeddingBagCollection):
            return {"kind": "half", "tables": sorted(module.tables)}
        return None


@pytest.fixture
def half() -> Iterator[HalfMethod]:
    from torchrec_compress import registry

    method = register(HalfMethod())
    yield method
    registry._METHODS.remove(method)


def _model() -> nn.Module:
    cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
    return nn.Sequential(EmbeddingBagCollection([cfg]))


def test_a_registered_method_is_reached_by_compress_and_the_layout(half: HalfMethod) -> None:
    model = _model()
    report = compress_(model, HalfConfig())
    assert method_of(HalfConfig()) is half
    assert type(model[0]) is HalfEmbeddingBagCollection
    assert model[0].tables["t"].dtype == torch.float16
    assert [(r.name, r.method, r.bytes_after) for r in report.rows] == [("t", "HALF", 800)]
    layout = compression_layout(model, [HalfConfig()])
    assert layout.modules["0"]["kind"] == "half"
    assert layout.modules["0"]["config"]["class"] == "HalfConfig"
    with pytest.raises(ValueError, match="already compressed"):  # registry's module types
        compress_(model, AFMConfig(rank=4), calibration=[])


def test_built_in_methods_come_first_and_clashes_are_refused(half: HalfMethod) -> None:
    names = [type(m).__name__ for m in registered_methods()]
    assert names == ["PQMethod", "LowRankMethod", "RowWiseQuantMethod", "HalfMethod"]
    with pytest.raises(ValueError, match=r"\['HalfConfig', 'half'\] are registered"):
        register(HalfMethod())
    with pytest.raises(TypeError, match="no compression method for CompressionConfig"):
        method_of(CompressionConfig())


def test_every_built_in_method_implements_the_protocol() -> None:
    """Every abstract step is implemented and every config, module and kind is its own."""
    for method in registered_methods():
        assert not getattr(type(method), "__abstractmethods__", None), type(method).__name__
        assert method.config_types and method.layout_kinds and method.module_types
        assert set(method.collection_types) <= set(method.module_types)
        assert set(method.placed_types) <= set(method.collection_types)
