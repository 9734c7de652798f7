"""``compress_``: compress a model's embedding tables and MLP layers in place, torchao-style.

``compress_(model, AFMConfig(rank=8), calibration=batches)`` finds every
``EmbeddingBagCollection`` (and, if asked, the hidden ``nn.Linear`` layers of MLPs), collects
statistics in one pass over the calibration data, factorises, and only then swaps the modules:
if anything fails (bad rank, unknown table, NaN) the model is left unchanged.

Each config class is a method in :mod:`torchrec_compress.registry`: its *local planner*
inspects the model (never mutating it) and returns a :class:`ConversionPlan` (fully qualified
name -> new module, plus report rows), which ``compress_`` applies atomically; its *sharded*
route compresses a ``DistributedModelParallel`` model where the rows live.  This module
registers the local planners of AFM, SVD, MEC and PQ; planners share
:func:`find_embedding_bag_collections` and :func:`calibrate` (lookup counts and Linear output
moments in one pass).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_compress.calibration import ForwardFn, calibrate, calibration_pass, default_forward
from torchrec_compress.config import (
    AFMConfig,
    CompressionConfig,
    LowRankConfig,
    MECConfig,
    PQConfig,
    SVDConfig,
)
from torchrec_compress.discovery import (
    FilterFn,
    find_embedding_bag_collections,
    find_mlp_hidden_linears,
    find_mlps,
    lowrank_parent,
    no_linear_reason,
    table_owners,
)
from torchrec_compress.distributed.compression import compress_sharded_model
from torchrec_compress.factorization import LowRankHandler, linear_factors
from torchrec_compress.guards import check_finite_tables, compresses_tables
from torchrec_compress.lowrank import PrincipalBasis, factor_table, projection, table_moments
from torchrec_compress.modules.lowrank_embedding_bag import LowRankEmbeddingBagCollection
from torchrec_compress.modules.lowrank_linear import LowRankLinear
from torchrec_compress.modules.pq_embedding_bag import PQEmbeddingBagCollection
from torchrec_compress.pq.method import PQHandler
from torchrec_compress.pq.metrics import code_usage
from torchrec_compress.rank import RankChoice
from torchrec_compress.registry import (
    ConversionPlan,
    Planner,
    handler_for,
    method_for,
    register_method,
)
from torchrec_compress.report import CompressionReport, ReportRow
from torchrec_compress.statistics import Moments

# names that lived here before the split into lower modules, still importable from here
__all__ = [
    "CompressionReport",
    "ConversionPlan",
    "FilterFn",
    "ForwardFn",
    "Planner",
    "ReportRow",
    "calibrate",
    "calibration_pass",
    "compress_",
    "default_forward",
    "find_embedding_bag_collections",
    "find_mlp_hidden_linears",
    "find_mlps",
    "linear_factors",
    "lowrank_parent",
    "table_owners",
]


def _plan_lowrank(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """AFM / SVD: statistics -> bases -> ranks (:func:`choose_ranks`) -> factors, for every
    selected table (:func:`_lowrank_collection`) and hidden MLP layer (:func:`linear_factors`)."""
    assert isinstance(config, LowRankConfig)
    is_afm = isinstance(config, AFMConfig)
    ebcs = find_embedding_bag_collections(model, filter_fn) if config.embeddings else {}
    linears = (
        find_mlp_hidden_linears(model, config.keep_mlp_ends, filter_fn) if config.linear else {}
    )
    table_owners(ebcs, config.table_overrides)
    if config.linear and not linears and ebcs:
        reason = no_linear_reason(model, config.keep_mlp_ends)
        warnings.warn(f"linear=True found no Linear layer to compress: {reason}", stacklevel=3)
    counts: dict[str, dict[str, torch.Tensor]] = {}
    linear_moments: dict[str, Moments] = {}
    if is_afm and (ebcs or linears):
        if calibration is None:
            raise ValueError("AFMConfig needs calibration data (an iterable of batches)")
        counts, linear_moments = calibrate(model, calibration, forward_fn, ebcs, linears)

    handler = handler_for(config)
    assert isinstance(handler, LowRankHandler)
    moments = {
        t.name: table_moments(
            ebc.embedding_bags[t.name].weight,
            counts[fqn][t.name] if handler.needs_lookup_counts else None,
            t.name,
        )
        for fqn, ebc in ebcs.items()
        for t in ebc.embedding_bag_configs()
    }
    tables = [t for ebc in ebcs.values() for t in ebc.embedding_bag_configs()]
    bases, choices = handler.fit(tables, moments)
    del counts  # float64 per row (160 MB for 20M rows): not needed by the factor tables

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        module, table_rows = _lowrank_collection(ebc, bases, choices, handler)
        rows += table_rows
        if module is not None:
            replacements[fqn] = module
    for fqn, layer in linears.items():
        row, new = linear_factors(fqn, layer, linear_moments[fqn] if is_afm else None, config)
        rows.append(row)
        if new is not None:
            replacements[fqn] = new
    return ConversionPlan(replacements, rows)


def _lowrank_collection(
    ebc: EmbeddingBagCollection,
    bases: Mapping[str, PrincipalBasis],
    choices: Mapping[str, RankChoice],
    handler: LowRankHandler,
) -> tuple[LowRankEmbeddingBagCollection | None, list[ReportRow]]:
    """One collection's low-rank replacement (kept tables at full width inside it), or ``None``
    when every table is kept, and its report rows."""
    tables = ebc.embedding_bag_configs()
    rows = [
        handler.table_row(
            t, bases[t.name], choices[t.name], ebc.embedding_bags[t.name].weight.element_size()
        )
        for t in tables
    ]
    table_ranks = {t.name: k for t in tables if (k := choices[t.name].rank) is not None}
    if not table_ranks:
        return None, rows
    module = LowRankEmbeddingBagCollection(tables, table_ranks, ebc.is_weighted(), ebc.device)
    for t in tables:
        weight, k = ebc.embedding_bags[t.name].weight, choices[t.name].rank
        if k is None:
            module.load_table_(t.name, weight)
        else:
            basis = bases[t.name]
            # written straight into the new module (one N x k factor table, not two); load_table_
            # then copies it onto itself, which torch skips
            factors = factor_table(weight, basis, k, out=module.factor_rows(t.name))
            module.load_table_(t.name, factors, projection(basis, k), basis.mean.to(torch.float32))
    return module, rows


def _plan_mec(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """Product-quantizes every selected table (MEC or plain weighted k-means, ``config.mode``).

    Lookup counts come from one calibration pass (:func:`calibrate`); each table that
    quantization makes smaller is quantized by :func:`~torchrec_compress.pq.train_pq_table` on
    CPU.  A table is kept (with a note and a warning) when ``M`` does not divide its dimension
    or its codes and codebooks would not be smaller than its rows; a table skipped by an
    override is kept too.  A kept table inside a collection that has quantized tables is
    stored exactly, as ``N`` codewords of one subspace (its rows) and identity codes, so the
    collection stays one module; a collection with no quantized table is left as it is.

    In a low-rank model (after ``compress_`` with :class:`AFMConfig`) the k-dim factor tables
    are quantized instead (rows x M codes, then the projection back to d): the factor columns
    are first reordered so that every subspace gets an equal share of the principal
    components' variance (:func:`~torchrec_compress.pq.subspace_order`), and the projection
    rows with them.
    """
    assert isinstance(config, MECConfig)
    handler = handler_for(config)
    assert isinstance(handler, PQHandler)
    ebcs = find_embedding_bag_collections(model, filter_fn, lowrank_factors=True)
    table_owners(ebcs, config.table_overrides)
    reasons = {
        t.name: handler.keep_reason(t) for ebc in ebcs.values() for t in ebc.embedding_bag_configs()
    }
    counts: dict[str, dict[str, torch.Tensor]] = {}
    if config.popularity_weighting and any(r is None for r in reasons.values()):
        if calibration is None:
            raise ValueError(
                "MECConfig(popularity_weighting=True) needs calibration data (an iterable of "
                "batches) for the lookup counts; pass calibration= or popularity_weighting=False"
            )
        counts, _ = calibrate(model, calibration, forward_fn, ebcs)
    _warn_kept_tables(reasons, handler.method)

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        module, table_rows = _quantize_collection(model, fqn, ebc, handler, reasons, counts)
        rows += table_rows
        if module is not None:
            replacements[module[0]] = module[1]
    return ConversionPlan(replacements, rows)


def _plan_pq(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """:class:`PQConfig`: the PQ branch of :func:`_plan_mec` (weighted k-means only)."""
    assert isinstance(config, PQConfig)
    return _plan_mec(model, config.to_mec_config(), calibration, filter_fn, forward_fn)


def _warn_kept_tables(reasons: Mapping[str, str | None], config_name: str) -> None:
    kept = {n: r for n, r in reasons.items() if r is not None and not r.startswith("skipped")}
    if kept:
        text = "; ".join(f"table {n!r}: {r}" for n, r in kept.items())
        warnings.warn(
            f"{config_name} keeps {len(kept)} table(s) uncompressed: {text}", stacklevel=4
        )


def _quantize_collection(
    model: nn.Module,
    fqn: str,
    ebc: EmbeddingBagCollection,
    handler: PQHandler,
    reasons: Mapping[str, str | None],
    counts: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[tuple[str, nn.Module] | None, list[ReportRow]]:
    """One collection's replacement (fqn, module), or ``None`` when no table is quantized (or
    the quantized collection would not be smaller), and its report rows."""
    tables = ebc.embedding_bag_configs()
    weights = {t.name: ebc.embedding_bags[t.name].weight.detach() for t in tables}
    if all(reasons[t.name] is not None for t in tables):
        return None, [
            handler.kept_row(t, reasons[t.name], bytes_per_element=weights[t.name].element_size())
            for t in tables
        ]
    lowrank = lowrank_parent(model, fqn)
    factor_ranks = lowrank.ranks() if lowrank is not None else {}
    codes: dict[str, torch.Tensor] = {}
    codebooks: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    rows: list[ReportRow] = []
    for t in tables:
        weight = weights[t.name]
        if weight.device.type == "meta":
            raise ValueError(f"table {t.name!r}: its weights are on the meta device")
        reason = reasons[t.name]
        if reason is not None:
            codes[t.name] = torch.arange(t.num_embeddings).unsqueeze(1)
            codebooks[t.name] = weight.float().cpu().unsqueeze(0)
            size = weight.element_size()
            # the collection derives identity codes: the table takes its rows' bytes alone
            row = handler.kept_row(t, reason, True, bytes_per_element=size, holds_codes=False)
            rows.append(row)
            continue
        table_counts = counts[fqn][t.name].cpu() if counts else None
        weight = weight.cpu()
        if t.name in factor_ranks:
            orders[t.name] = handler.subspace_order(weight, table_counts, t.name)
            weight = weight[:, orders[t.name]]
        quantizer = handler.fit(weight, table_counts, t.name)
        codebooks[t.name] = handler.codebooks(quantizer)
        codes[t.name] = handler.encode(quantizer, weight, t.name)
        usage = code_usage(codes[t.name], codebooks[t.name].shape[1])
        size = weights[t.name].element_size()
        rows.append(handler.table_row(t, codebooks[t.name], usage, size))
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    if after >= before:
        note = f"collection {fqn!r} would not be smaller quantized ({after} >= {before} bytes)"
        return None, [
            handler.kept_row(t, note, bytes_per_element=weights[t.name].element_size())
            for t in tables
        ]
    module = PQEmbeddingBagCollection(tables, codes, codebooks, ebc.is_weighted()).to(ebc.device)
    if lowrank is None:
        return (fqn, module), rows
    return (fqn.rpartition(".")[0], lowrank.with_factor_collection(module, orders)), rows


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
        if isinstance(m, (LowRankEmbeddingBagCollection, PQEmbeddingBagCollection, LowRankLinear))
    }
    wanted = "EmbeddingBagCollection tables"
    if isinstance(config, LowRankConfig):
        wanted = " or ".join(
            w for w, on in ((wanted, config.embeddings), ("MLP Linear layers", config.linear)) if on
        )
    text = (
        f"{type(config).__name__} found nothing to compress in {type(model).__name__}: no {wanted}"
    )
    if compressed:
        text += (
            f"; the model is already compressed ({compressed}): compressing twice with the same "
            "method is not supported (MEC/PQ after AFM/SVD quantizes the factor tables)"
        )
    return ValueError(text + " (after filter_fn, if given)")


register_method(AFMConfig, local=_plan_lowrank)
register_method(SVDConfig, local=_plan_lowrank)
register_method(MECConfig, local=_plan_mec)
register_method(PQConfig, local=_plan_pq)


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
            only, see :mod:`torchrec_compress.distributed.rowwise_quant`).
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
        ValueError: naming the table/layer/value at fault; when nothing is left to compress.

    Example::

        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg]))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.arange(40) % 50, lengths=torch.full((20,), 2))
        >>> report = compress_(model, AFMConfig(rank=4), calibration=[kjt])
        >>> type(model[0]).__name__, report.rows[0].rank
        ('LowRankEmbeddingBagCollection', 4)
        >>> # sharded, on every process: compress_(dmp, AFMConfig(rank=4), my_batches).reshard(device)
    """
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
    planner = method_for(config, sharded=False)
    _check_unsharded(model)
    if compresses_tables(config):
        collections = find_embedding_bag_collections(model, filter_fn, lowrank_factors=True)
        check_finite_tables(collections.values())
    if not isinstance(config, LowRankConfig) or config.embeddings:
        _warn_sequence_tables(model, filter_fn)
    plan = planner(model, config, calibration, filter_fn, forward_fn)
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
