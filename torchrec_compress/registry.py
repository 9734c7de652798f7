"""One registry of compression methods, keyed by config class (torchao's handler registry).

A method is a config class, a module, its handler and the two drivers registered here.  The
handler holds the method's own steps (e.g. basis and rank from a table's moments, a quantizer
fitted on a sample of rows and the codes of any rows, each table's report row); both drivers
call it through :func:`handler_for`, and only move data around it.  ``local`` plans
the compression of an unsharded model (it inspects the model and returns a
:class:`ConversionPlan`, never mutating it, so ``compress_`` swaps modules only when everything
succeeded), and ``sharded`` compresses a ``DistributedModelParallel`` model where its rows live
(returning the compressed skeleton, its state and the report, for
``ShardedCompressionReport.reshard``).  ``torchrec_compress.compress_`` looks the config's class
up here for either kind of model, so adding a method touches no driver: its own file calls
:func:`register_method` (the local planners register from ``torchrec_compress.api``, the sharded
routes from ``torchrec_compress.distributed.compression``; neither imports the other's driver).

Example::

    >>> from torchrec_compress.config import AFMConfig
    >>> from torchrec_compress.registry import method_for
    >>> import torchrec_compress.api  # registers the built-in methods
    >>> callable(method_for(AFMConfig(rank=4), sharded=False))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchrec_compress.calibration import ForwardFn
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import FilterFn
from torchrec_compress.report import CompressionReport, ReportRow


@dataclass
class ConversionPlan:
    """What a local planner wants swapped: fully qualified name -> new module, and report rows."""

    replacements: dict[str, nn.Module]
    rows: list[ReportRow]


# (model, config, calibration, filter_fn, forward_fn) -> plan
Planner = Callable[
    [nn.Module, CompressionConfig, Iterable[Any] | None, FilterFn | None, ForwardFn],
    ConversionPlan,
]
# (sharded model, unsharded skeleton on meta, config, calibration, forward_fn, filter_fn)
# -> (compressed skeleton, its state dict, report)
ShardedPlanner = Callable[
    [Any, nn.Module, CompressionConfig, Iterable[Any] | None, ForwardFn, FilterFn | None],
    tuple[nn.Module, dict[str, Any], CompressionReport],
]


@dataclass(frozen=True)
class CompressionMethod:
    """The functions of one method; any may be missing (e.g. no sharded route yet)."""

    local: Planner | None = None
    sharded: ShardedPlanner | None = None
    handler: Callable[[Any], Any] | None = None


METHODS: dict[type[CompressionConfig], CompressionMethod] = {}


def register_method(
    config_class: type[CompressionConfig],
    *,
    local: Planner | None = None,
    sharded: ShardedPlanner | None = None,
    handler: Callable[[Any], Any] | None = None,
) -> None:
    """Registers the ``local`` / ``sharded`` driver and/or the ``handler`` of a method.

    Each may be registered separately (by the module that implements it); registering one again
    replaces it.

    Args:
        config_class (type[CompressionConfig]): the method's config class (exact type).
        local (Optional[Planner]): plans the compression of an unsharded model.
        sharded (Optional[ShardedPlanner]): compresses a ``DistributedModelParallel`` model.
        handler (Optional[Callable]): builds the method's handler from a config (e.g. the
            handler class itself).
    """
    old = METHODS.get(config_class, CompressionMethod())
    METHODS[config_class] = CompressionMethod(
        local=local or old.local,
        sharded=sharded or old.sharded,
        handler=handler or old.handler,
    )


def handler_for(config: CompressionConfig) -> Any:
    """The handler of ``config``'s method, built from ``config`` (what both drivers call).

    Example::

        >>> from torchrec_compress.config import SVDConfig
        >>> import torchrec_compress.methods.lowrank.handler  # registers the AFM / SVD handler
        >>> handler_for(SVDConfig(rank=4)).method
        'SVD'

    Raises:
        TypeError: naming the config class when its method registered no handler.
    """
    handler = METHODS.get(type(config), CompressionMethod()).handler
    if handler is None:
        known = sorted(c.__name__ for c, m in METHODS.items() if m.handler is not None)
        raise TypeError(f"no handler for {type(config).__name__}; configs with one: {known}")
    return handler(config)


def method_for(config: CompressionConfig, sharded: bool) -> Callable[..., Any]:
    """The registered function of ``config``'s method for an unsharded or a sharded model.

    Raises:
        TypeError: naming the config class and the classes that have such a function.
    """
    method = METHODS.get(type(config), CompressionMethod())
    found = method.sharded if sharded else method.local
    if found is None:
        kind = "sharded (DistributedModelParallel)" if sharded else "unsharded"
        known = sorted(
            c.__name__ for c, m in METHODS.items() if (m.sharded if sharded else m.local)
        )
        raise TypeError(
            f"no {kind} compression for {type(config).__name__}; configs with one: {known}"
            + (" (or compress before sharding)" if sharded else "")
        )
    return found
