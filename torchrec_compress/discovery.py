"""Finding what a model has to compress: its ``EmbeddingBagCollection`` s, the tables they hold
and the ``nn.Linear`` layers of its MLPs (plain modules only; a sharded model is searched through
its unsharded skeleton).

The modules a method made are left alone (``registry.compressed_module_types()``), except the
factor collection of a :class:`FactorCollectionHolder` (AFM's factor tables), which another
method may compress further."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.registry import FilterFn, compressed_module_types

__all__ = [
    "FactorCollectionHolder",
    "FilterFn",
    "factor_parent",
    "find_embedding_bag_collections",
    "find_mlp_hidden_linears",
    "find_mlps",
    "no_linear_reason",
    "table_owners",
]


@runtime_checkable
class FactorCollectionHolder(Protocol):
    """A compressed collection whose stored tables are a collection of their own (AFM's factor
    tables, ``factor_ebc``), which another method may compress further (product quantization,
    int8 rows): it then takes the compressed factor collection in place of its own.
    """

    factor_ebc: nn.Module

    def ranks(self) -> dict[str, int]:
        """Table name -> width of its factor rows, for the tables it compresses."""

    def with_factor_collection(
        self, factor_collection: nn.Module, column_orders: Mapping[str, torch.Tensor] | None = None
    ) -> Any:
        """A copy holding ``factor_collection`` (its columns of table ``t`` in the order
        ``column_orders[t]``) in place of ``factor_ebc``."""

    def check_factors_compressible(self, fqn: str) -> None:
        """Raises naming ``fqn`` when its factor tables cannot be compressed further."""

    def column_order_keys(self, table: str) -> list[str]:
        """Its state-dict keys (relative to it) whose first dimension runs over the factor
        columns of ``table``: reordered with the columns when these are (product
        quantization's subspace order)."""


def find_embedding_bag_collections(
    model: nn.Module, filter_fn: FilterFn | None = None, lowrank_factors: bool = False
) -> dict[str, EmbeddingBagCollection]:
    """Every ``EmbeddingBagCollection`` in ``model`` by fully qualified name, excluding those
    ``filter_fn(module, fqn)`` rejects and those already inside a compressed module, except,
    with ``lowrank_factors``, the factor tables of a :class:`FactorCollectionHolder`
    (``<fqn>.factor_ebc``, which product quantization or int8 rows can compress further)."""
    found: dict[str, EmbeddingBagCollection] = {}
    compressed = compressed_module_types()

    def visit(module: nn.Module, fqn: str) -> None:
        if isinstance(module, EmbeddingBagCollection):
            if filter_fn is None or filter_fn(module, fqn):
                found[fqn] = module
            return
        if isinstance(module, FactorCollectionHolder):
            if lowrank_factors and isinstance(module.factor_ebc, EmbeddingBagCollection):
                module.check_factors_compressible(fqn or "<model>")
                visit(module.factor_ebc, f"{fqn}.factor_ebc" if fqn else "factor_ebc")
            return
        if isinstance(module, compressed):
            return
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    return found


def find_mlps(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, list[str]]:
    """The model's MLPs: fully qualified name -> the fqns of its ``nn.Linear`` layers, in module
    order (a lone Linear outside any MLP is an MLP of one layer, named by itself).

    An MLP is the outermost module that is either an ``nn.Sequential`` holding two or more
    ``nn.Linear`` layers at any depth (``torchrec.modules.mlp.MLP`` is a Sequential of
    ``Perceptron``\\ s; DLRM's over arch is a Sequential of an MLP and a final Linear, one MLP
    of all their layers), or a module with two or more Linear layers among its children and
    its ``nn.ModuleList`` children's children (TorchRec's ``TestDHNArch``: ``linear0``,
    ``linear1``; ``TestDenseArch``: ``hidden_layers`` then ``linear``).  Layers
    inside a module a method made (e.g. a ``LowRankLinear``) are never listed; ``filter_fn(layer, fqn)`` drops layers
    (the ends of an MLP stay its ends).

    Args:
        model (nn.Module): e.g. ``torchrec.models.dlrm.DLRM``.
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): applied to every layer.

    Example::

        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1))
        >>> find_mlps(nn.ModuleDict({"top": mlp, "head": nn.Linear(2, 1)}))
        {'top': ['top.0', 'top.2', 'top.3'], 'head': ['head']}
    """
    found: dict[str, list[str]] = {}

    def join(fqn: str, name: str) -> str:
        return f"{fqn}.{name}" if fqn else name

    compressed = compressed_module_types()

    def linears(module: nn.Module, fqn: str) -> list[str]:
        if isinstance(module, compressed):
            return []
        if type(module) is nn.Linear:
            return [fqn] if filter_fn is None or filter_fn(module, fqn) else []
        return [x for n, c in module.named_children() for x in linears(c, join(fqn, n))]

    def direct_linears(module: nn.Module) -> int:
        children = list(module.children())
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                children += list(child.children())
        return sum(type(c) is nn.Linear for c in children)

    def visit(module: nn.Module, fqn: str) -> None:
        if isinstance(module, compressed):
            return
        sequential = isinstance(module, nn.Sequential) and len(linears(module, fqn)) >= 2
        if type(module) is nn.Linear or sequential or direct_linears(module) >= 2:
            if layers := linears(module, fqn):
                found[fqn] = layers
            return
        for name, child in module.named_children():
            visit(child, join(fqn, name))

    visit(model, "")
    return found


def find_mlp_hidden_linears(
    model: nn.Module, keep_mlp_ends: bool = True, filter_fn: FilterFn | None = None
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of MLPs to compress, by fully qualified name.

    MLPs are found by :func:`find_mlps`.  With ``keep_mlp_ends`` the first and last layer of
    every MLP are left out (so MLPs of one or two layers give none); without it every
    ``nn.Linear`` of the model (outside the modules a method made) is taken.

    Args:
        model (nn.Module): the model to search.
        keep_mlp_ends (bool): leave the first and last layer of every MLP out.
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): ``(layer, fqn) -> bool``.

    Example::

        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1))
        >>> list(find_mlp_hidden_linears(mlp)), len(find_mlp_hidden_linears(mlp, False))
        (['2'], 3)
    """
    found: dict[str, nn.Linear] = {}
    for layers in find_mlps(model).values():
        for name in layers[1:-1] if keep_mlp_ends else layers:
            layer = model.get_submodule(name)
            if filter_fn is None or filter_fn(layer, name):
                found[name] = cast(nn.Linear, layer)
    return found


def no_linear_reason(model: nn.Module, keep_mlp_ends: bool) -> str:
    mlps = find_mlps(model)
    if not mlps:
        return "the model has no nn.Linear layer outside the modules compress_ made"
    if keep_mlp_ends and all(len(layers) <= 2 for layers in mlps.values()):
        sizes = {fqn: len(layers) for fqn, layers in mlps.items()}
        return (
            f"its MLPs {sizes} (fqn: Linear layers) have no layer between their first and "
            "last, which keep_mlp_ends=True keeps; pass keep_mlp_ends=False to compress them"
        )
    return "filter_fn rejected every candidate layer"


def table_owners(
    ebcs: Mapping[str, EmbeddingBagCollection], table_overrides: Iterable[str] = ()
) -> dict[str, str]:
    """Table name -> fqn of the collection holding it.

    Raises:
        ValueError: naming the table and both collections when a name repeats (compression
            is keyed by table name), or naming override keys that match no table.
    """
    owners: dict[str, str] = {}
    for fqn, ebc in ebcs.items():
        for table in ebc.embedding_bag_configs():
            if table.name in owners:
                raise ValueError(
                    f"table {table.name!r} appears in both {owners[table.name]!r} and {fqn!r}; "
                    "table names must be unique across the model"
                )
            owners[table.name] = fqn
    unknown = sorted(set(table_overrides) - set(owners))
    if unknown:
        raise ValueError(
            f"table_overrides name unknown table(s) {unknown}; tables are {sorted(owners)}"
        )
    return owners


def factor_parent(model: nn.Module, fqn: str) -> FactorCollectionHolder | None:
    """The :class:`FactorCollectionHolder` whose ``factor_ebc`` is at ``fqn``, if any."""
    parent, _, child = fqn.rpartition(".")
    if child != "factor_ebc":
        return None
    module = model.get_submodule(parent)
    return module if isinstance(module, FactorCollectionHolder) else None
