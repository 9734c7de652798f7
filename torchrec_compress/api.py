"""``compress_``: compress a model's embedding tables and MLP layers in place, torchao-style.

``compress_(model, AFMConfig(rank=8), calibration=batches)`` finds every
``EmbeddingBagCollection`` (and, if asked, the hidden ``nn.Linear`` layers of MLPs), collects
statistics in one pass over the calibration data, factorises, and only then swaps the modules:
if anything fails (bad rank, unknown table, NaN) the model is left unchanged.

Each config class belongs to one method of :mod:`torchrec_compress.registry` (its folder under
``torchrec_compress/methods/``), and this module knows none by name: the method's *local
driver* (``CompressionMethod.plan``) inspects the model (never mutating it) and returns a
``ConversionPlan`` (fully qualified name -> new module, plus report rows), which ``compress_``
applies atomically; its *sharded driver* compresses a ``DistributedModelParallel`` model where
the rows live (:func:`~torchrec_compress.distributed.compression.compress_sharded_model`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import EmbeddingCollection

from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.budget.driver import compress_within_budget
from torchrec_compress.calibration import ForwardFn, default_forward
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import FilterFn, find_embedding_bag_collections
from torchrec_compress.distributed.budget import compress_sharded_within_budget
from torchrec_compress.distributed.compression import compress_sharded_model
from torchrec_compress.guards import check_finite_tables
from torchrec_compress.registry import compressed_module_types, method_of
from torchrec_compress.report import CompressionReport

__all__ = ["compress_"]


def _check_unsharded(model: nn.Module) -> None:
    """Below the DMP route, ``compress_`` swaps modules of an unsharded, unwrapped model: a
    module tree holding sharded modules (e.g. ``dmp.module``) or DDP is refused."""
    sharded = [fqn or "<model>" for fqn, m in model.named_modules() if isinstance(m, ShardedModule)]
    if sharded:
        raise TypeError(
            f"compress_ got a {type(model).__name__} holding sharded modules (at {sharded[:3]}) "
            "outside DistributedModelParallel: pass the DistributedModelParallel model itself "
            "(compress_(dmp, config, ...) then report.reshard(device))"
        )
    wrapped = [fqn or "<model>" for fqn, m in model.named_modules() if isinstance(m, DDP)]
    if wrapped:
        raise TypeError(
            f"compress_ cannot swap modules inside DistributedDataParallel (at {wrapped}): "
            "compress the unwrapped module first, then wrap it"
        )


def _warn_sequence_tables(model: nn.Module, filter_fn: FilterFn | None) -> None:
    """EmbeddingCollection (sequence, unpooled) tables are not supported: say which are left."""
    left = {
        fqn: [t.name for t in m.embedding_configs()]
        for fqn, m in model.named_modules()
        if isinstance(m, EmbeddingCollection) and (filter_fn is None or filter_fn(m, fqn))
    }
    if left:
        warnings.warn(
            f"EmbeddingCollection tables are not supported by compress_ and are left "
            f"uncompressed: {left} (collection fqn: tables); only EmbeddingBagCollection "
            "tables are compressed",
            stacklevel=3,
        )


def _nothing_to_compress(model: nn.Module, config: CompressionConfig) -> ValueError:
    compressed = {
        fqn: type(m).__name__
        for fqn, m in model.named_modules()
        if isinstance(m, compressed_module_types())
    }
    text = (
        f"{type(config).__name__} found nothing to compress in {type(model).__name__}: "
        f"no {config.targets()}"
    )
    if compressed:
        text += (
            f"; the model is already compressed ({compressed}): compressing twice with the same "
            "method is not supported (MEC/PQ after AFM/SVD quantizes the factor tables)"
        )
    return ValueError(text + " (after filter_fn, if given)")


def compress_(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None = None,
    filter_fn: FilterFn | None = None,
    forward_fn: ForwardFn = default_forward,
    *,
    meta_model: nn.Module | None = None,
) -> CompressionReport:
    """Compresses ``model`` (plain or ``DistributedModelParallel``) and reports what changed.

    A plain model is compressed in place: every selected module is planned first (statistics,
    ranks, factors); the swap happens only when all of them succeeded, so on any error the
    model is unchanged.

    A ``DistributedModelParallel`` model is compressed where its rows live (collective: every
    process calls ``compress_`` with its own calibration batches; statistics are summed over
    the group, factors and codes computed by the processes holding the rows, no table is
    gathered on one process) and left unchanged.  The result is a
    :class:`~torchrec_compress.distributed.compression.ShardedCompressionReport`, whose one
    call ``report.reshard(device)`` re-plans the compressed model at its true sizes, shards it
    and loads the compressed state, for every method alike.

    Never bigger, never silent: a table or layer is replaced only when that makes it smaller;
    otherwise it is kept, with a warning and a ``note`` in its report row (e.g. a rank above
    ``min(rows, dim)``, a variance target that needs every direction, ``M`` not dividing a
    table's dimension, a 1-output logit layer).  A collection whose tables are all kept stays
    the original module.  Errors, rather than a silent empty report: a DDP-wrapped model or a
    module tree holding sharded modules outside DMP, nothing to compress (e.g. a model
    already compressed with the same method), calibration data that yields no batch.
    ``EmbeddingCollection`` (sequence) tables are not supported: a warning names them.

    Args:
        model (nn.Module): e.g. ``torchrec.models.dlrm.DLRM``, or one sharded by
            ``DistributedModelParallel``; compressed modules are swapped into their parents
            (the model itself cannot be the swapped module).
        config (CompressionConfig): :class:`AFMConfig`, :class:`SVDConfig`, :class:`MECConfig`,
            :class:`PQConfig`, ``RowWiseQuantConfig`` (DMP models take all five; int8 / fp16 rows
            only, see :mod:`torchrec_compress.methods.rowwise_quant.sharded_driver`), or
            ``BudgetConfig`` (one byte budget, the best option per table, see
            :mod:`torchrec_compress.budget`; DMP models: :mod:`torchrec_compress.distributed.budget`).
        calibration (Optional[Iterable]): batches (``Batch`` or ``KeyedJaggedTensor``); needed by
            AFM, accepted and ignored by SVD.  Iterated once.  DMP: this process's batches.
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): ``(module, fqn) -> bool``; only
            modules it accepts are compressed (DMP: the unsharded modules, same fqns).
        forward_fn (Callable[[nn.Module, Any], Any]): how to run the model on one batch;
            default :func:`default_forward`.
        meta_model (Optional[nn.Module]): DMP models only, and only when the unsharded
            architecture cannot be derived from the DMP model (a sharded module type this
            package does not know): the same model unsharded on ``meta``.

    Returns:
        CompressionReport: one row per table/layer, with bytes and explained variance; a
        ``ShardedCompressionReport`` (with ``reshard``) for a DMP model.

    Raises:
        TypeError: for a DDP-wrapped model, sharded modules outside DMP, or a config type
            without converter.
        ValueError: naming the table/layer/value at fault; when nothing is left to compress;
            naming the smallest reachable size when a ``BudgetConfig``'s budget is below it.
        NotImplementedError: a ``BudgetConfig`` with ``objective="fisher"`` or ``"loss_delta"``
            and a DMP model.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> from torchrec_compress.methods.lowrank.config import AFMConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg]))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.arange(40) % 50, lengths=torch.full((20,), 2))
        >>> report = compress_(model, AFMConfig(rank=4), calibration=[kjt])
        >>> type(model[0]).__name__, report.rows[0].rank
        ('LowRankEmbeddingBagCollection', 4)
        >>> # sharded, on every process: compress_(dmp, AFMConfig(rank=4), my_batches).reshard(device)
    """
    if isinstance(config, BudgetConfig):
        if isinstance(model, DistributedModelParallel):
            return compress_sharded_within_budget(
                model, config, calibration, filter_fn, forward_fn, meta_model
            )
        _check_unsharded(model)
        return compress_within_budget(model, config, calibration, filter_fn, forward_fn)
    if isinstance(model, DistributedModelParallel):
        sharded = compress_sharded_model(
            model, config, calibration, filter_fn, forward_fn, meta_model=meta_model
        )
        if not sharded.rows:
            assert sharded.compressed_model is not None
            raise _nothing_to_compress(sharded.compressed_model, config)
        return sharded
    if meta_model is not None:
        raise TypeError("compress_: meta_model= is for DistributedModelParallel models only")
    method = method_of(config)
    _check_unsharded(model)
    if config.compresses_tables:
        collections = find_embedding_bag_collections(model, filter_fn, lowrank_factors=True)
        check_finite_tables(collections.values())
        _warn_sequence_tables(model, filter_fn)
    plan = method.plan(model, config, calibration, filter_fn, forward_fn)
    if not plan.rows:
        raise _nothing_to_compress(model, config)
    if "" in plan.replacements:
        raise ValueError(
            f"cannot replace the model itself ({type(model).__name__}) in place; "
            "wrap it in a parent module"
        )
    for fqn, new_module in plan.replacements.items():
        parent_fqn, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn), child, new_module)
    return CompressionReport(plan.rows)
