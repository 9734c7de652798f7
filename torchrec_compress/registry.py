"""One registry of compression methods (torchao's handler registry), typed by what a method provides.

A method lives in one folder, ``torchrec_compress/methods/<name>/``, and is one
:class:`CompressionMethod`: a built-in one is one line of :data:`BUILT_IN` (where its class
lives), loaded on first use, as torchx loads its schedulers; any other is passed to
:func:`register`.  Everything outside the method folders reaches a method through this registry
only, and knows none by name:

* ``compress_`` on a plain model calls :meth:`CompressionMethod.plan` (the local driver: it
  inspects the model and returns a :class:`ConversionPlan`, never mutating it, so that
  ``compress_`` swaps modules only when everything succeeded); on a
  ``DistributedModelParallel`` model :meth:`CompressionMethod.compress_sharded` (the sharded
  driver: factors / codes computed where the rows live);
* both drivers run the method's own steps through :meth:`CompressionMethod.handler`;
* ``torchrec_compress.sharders(model)`` asks each method for the sharders of its modules
  (:meth:`CompressionMethod.sharders`), which the planner sizes at their true compressed sizes;
* the checkpoint layout describes and rebuilds a method's modules through
  :meth:`CompressionMethod.describe` / :meth:`CompressionMethod.restore`, and a DMP model's
  unsharded architecture comes from :meth:`CompressionMethod.skeleton`;
* reports, "already compressed" checks and re-initialisation read
  :attr:`CompressionMethod.module_types`.

Example::

    >>> sorted(config_classes())
    ['AFMConfig', 'MECConfig', 'PQConfig', 'RowWiseQuantConfig', 'SVDConfig']
    >>> type(method_of(config_classes()["AFMConfig"](rank=4))).__name__
    'LowRankMethod'
    >>> sorted(kind for m in registered_methods() for kind in m.layout_kinds)
    ['composite', 'lowrank', 'lowrank_linear', 'pq', 'rowwise_quant']
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.report import CompressionReport, ReportRow

# (module, fully qualified name) -> whether compress_ may compress it
FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConversionPlan:
    """What a local driver wants swapped: fully qualified name -> new module, and report rows."""

    replacements: dict[str, nn.Module]
    rows: list[ReportRow]


@dataclass
class ShardedCompression:
    """What a sharded driver returns: the compressed architecture (unsharded, on ``meta``), its
    state dict (shards where the rows live) and the report."""

    module: nn.Module
    state: dict[str, Any]
    report: CompressionReport


@dataclass
class SharderContext:
    """What a method's :meth:`~CompressionMethod.sharders` may use.

    Args:
        model (Optional[nn.Module]): the model to shard (``None``: sharders for any model).
        ebc_sharder (ModuleSharder): the sharder of plain ``EmbeddingBagCollection`` s (and of
            the ones a compressed collection keeps inside it).
        by_type (dict[type, ModuleSharder]): the sharder of each compressed collection type,
            filled as methods are asked: a method reaches another method's sharder through it
            (e.g. AFM's factor tables product-quantized), never by import; looked up when a
            model is planned and sharded, after every method was asked.
        feature_processed (dict[type, ModuleSharder]): a method's own sharder of a
            ``FeatureProcessedEmbeddingBagCollection`` over its collection type, where the
            shared one does not fit.
    """

    model: nn.Module | None
    ebc_sharder: ModuleSharder[Any]
    by_type: dict[type[nn.Module], ModuleSharder[Any]] = field(default_factory=dict)
    feature_processed: dict[type[nn.Module], ModuleSharder[Any]] = field(default_factory=dict)


@dataclass
class LayoutBuilder:
    """What a method's :meth:`~CompressionMethod.restore` may use: where new modules live, and
    how to build the module of a nested entry (e.g. the factor collection of AFM then MEC)."""

    device: torch.device
    quantized_device: torch.device
    collection: Callable[[nn.Module, Mapping[str, Any], str], nn.Module]


class CompressionMethod(ABC):
    """A compression method: its configs, its modules and the functions every driver calls.

    Subclasses set the class attributes and implement the abstract methods; the others have
    defaults for methods without sharded modules or layout entries.
    """

    #: the config classes this method compresses with (exact types)
    config_types: ClassVar[tuple[type[CompressionConfig], ...]] = ()
    #: the compressed modules it makes (a model holding them is already compressed by it)
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: those of :attr:`module_types` that are embedding collections (sparse, not dense layers)
    collection_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: those of :attr:`collection_types` whose own tables the planner places one by one (a
    #: sharding type forced on every table applies to them; not to replicated ones, nor to
    #: those whose tables are a plain ``EmbeddingBagCollection`` inside them)
    placed_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: the ``kind`` s of the layout entries its modules get (see ``torchrec_compress.layout``)
    layout_kinds: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def handler(self, config: CompressionConfig) -> Any:
        """The method's own steps for ``config`` (what both drivers call)."""

    @abstractmethod
    def plan(
        self,
        model: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        filter_fn: FilterFn | None,
        forward_fn: ForwardFn,
    ) -> ConversionPlan:
        """The local driver: what to swap in an unsharded ``model`` (never mutating it)."""

    @abstractmethod
    def compress_sharded(
        self,
        model: nn.Module,
        skeleton: nn.Module,
        config: CompressionConfig,
        calibration: Iterable[Any] | None,
        forward_fn: ForwardFn,
        filter_fn: FilterFn | None,
    ) -> ShardedCompression:
        """The sharded driver: compresses a ``DistributedModelParallel`` ``model`` (collective)
        whose unsharded architecture on ``meta`` is ``skeleton``; ``model`` is left unchanged."""

    def sharders(self, context: SharderContext) -> list[ModuleSharder[Any]]:
        """The sharders of this method's modules (none by default)."""
        return []

    def skeleton(
        self, module: nn.Module, fqn: str, skeleton_of: Callable[[nn.Module, str], nn.Module]
    ) -> nn.Module | None:
        """The empty unsharded module (on ``meta``) of one of this method's sharded modules, or
        ``None`` when ``module`` is not one; ``skeleton_of`` derives that of a nested one."""
        return None

    def describe(
        self, module: nn.Module, describe: Callable[[nn.Module], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """The layout entry (``kind`` and shapes) of one of this method's modules, or ``None``;
        ``describe`` gives that of a nested module."""
        return None

    def restore(
        self, current: nn.Module, entry: Mapping[str, Any], path: str, build: LayoutBuilder
    ) -> nn.Module:
        """The empty module that layout ``entry`` (one of :attr:`layout_kinds`) describes, in
        place of the uncompressed ``current`` at ``path``."""
        raise ValueError(f"layout of {path!r}: kind {entry.get('kind')!r} cannot be restored")


#: the built-in methods, ``module:class``, in the order their sharders are listed; adding a
#: method is one folder under ``torchrec_compress/methods/`` and one line here
BUILT_IN: tuple[str, ...] = (
    "torchrec_compress.methods.pq.method:PQMethod",
    "torchrec_compress.methods.lowrank.method:LowRankMethod",
    "torchrec_compress.methods.rowwise_quant.method:RowWiseQuantMethod",
)

_METHODS: list[CompressionMethod] = []
_LOADED: list[bool] = [False]


def _methods() -> list[CompressionMethod]:
    """The registered methods, the built-in ones first (loaded on first use, so that importing
    a config stays light and no shared module imports a method)."""
    if not _LOADED[0]:
        _LOADED[0] = True
        built_in = []
        for path in BUILT_IN:
            module, _, name = path.partition(":")
            built_in.append(getattr(importlib.import_module(module), name)())
        _METHODS[:0] = _checked(built_in, _METHODS)
    return _METHODS


def _checked(
    new: list[CompressionMethod], registered: list[CompressionMethod]
) -> list[CompressionMethod]:
    """``new``, when none of its config types or layout kinds is registered already."""
    taken_configs = {c for m in registered for c in m.config_types}
    taken_kinds = {k for m in registered for k in m.layout_kinds}
    for method in new:
        clash = sorted(c.__name__ for c in method.config_types if c in taken_configs)
        clash += sorted(k for k in method.layout_kinds if k in taken_kinds)
        if clash:
            raise ValueError(f"{type(method).__name__}: {clash} are registered by another method")
        taken_configs.update(method.config_types)
        taken_kinds.update(method.layout_kinds)
    return new


def register(method: CompressionMethod) -> CompressionMethod:
    """Registers ``method`` (its config types must not be registered yet); returns it.

    Raises:
        ValueError: naming a config type or layout kind another method registered.
    """
    _METHODS.extend(_checked([method], _methods()))
    return method


def registered_methods() -> list[CompressionMethod]:
    """Every registered method, in registration order."""
    return list(_methods())


def method_of(config: CompressionConfig) -> CompressionMethod:
    """The method that compresses with ``config``'s class.

    Raises:
        TypeError: naming the config class and the registered ones.
    """
    for method in _methods():
        if type(config) in method.config_types:
            return method
    known = sorted(c.__name__ for m in _methods() for c in m.config_types)
    raise TypeError(f"no compression method for {type(config).__name__}; registered: {known}")


def method_of_kind(kind: str) -> CompressionMethod:
    """The method whose modules get layout entries of ``kind``.

    Raises:
        ValueError: naming the kind and the registered ones.
    """
    for method in _methods():
        if kind in method.layout_kinds:
            return method
    known = sorted(k for m in _methods() for k in m.layout_kinds)
    raise ValueError(f"layout kind {kind!r} is not known; valid: {known}")


def config_classes() -> dict[str, type[CompressionConfig]]:
    """Every registered config class by name (what a saved layout names)."""
    return {c.__name__: c for m in _methods() for c in m.config_types}


def compressed_module_types() -> tuple[type[nn.Module], ...]:
    """Every registered method's compressed module types."""
    return tuple(t for m in _methods() for t in m.module_types)


def method_sharders(context: SharderContext) -> list[ModuleSharder[Any]]:
    """Every registered method's sharders, in registration order; fills ``context``."""
    return [s for m in _methods() for s in m.sharders(context)]


def compressed_collection_types() -> tuple[type[nn.Module], ...]:
    """Every registered method's compressed embedding collection types."""
    return tuple(t for m in _methods() for t in m.collection_types)


def placed_collection_types() -> tuple[type[nn.Module], ...]:
    """Every registered method's :attr:`~CompressionMethod.placed_types`."""
    return tuple(t for m in _methods() for t in m.placed_types)


def handler_for(config: CompressionConfig) -> Any:
    """The handler of ``config``'s method, built from ``config`` (what both drivers call).

    Example::

        >>> handler_for(config_classes()["SVDConfig"](rank=4)).method
        'SVD'
    """
    return method_of(config).handler(config)
