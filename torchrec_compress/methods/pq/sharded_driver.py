"""MEC / PQ compression of a DMP-sharded model, codes computed where the rows live.

The MEC/PQ route of ``torchrec_compress.compress_`` on a ``DistributedModelParallel`` model
(:func:`sharded_pq_state`); it mirrors the low-rank one
(:func:`~torchrec_compress.methods.lowrank.sharded_driver.sharded_lowrank_state`):

1. one calibration pass counts lookups (sparse ``(id, count)`` pairs, summed over the group);
2. per table, a bounded training sample of rows (at most ``kmeans_sample_size``: the most
   looked-up rows whole, a uniform draw of the others, with their global lookup counts) is
   gathered, the same rows with the same seed as the local driver's k-means sample; rank 0
   trains the quantizer (MEC or plain weighted k-means) and broadcasts it, so every process
   holds the same one (for plain PQ the quantizer of the unsharded model; MEC's training then
   sees the sample only, where the local driver's sees every row);
3. every process encodes the rows *it holds* of the original table, chunk by chunk, into a
   row-sharded ``uint8`` codes tensor with the original's row layout (nothing but the sample and
   the quantizer crosses the network);
4. the compressed state (codes as ``ShardedTensor``, replicated codebooks, the dense weights) is
   returned with ``meta_model``, whose collections became ``PQEmbeddingBagCollection`` s on
   ``meta``; ``ShardedCompressionReport.reshard`` plans and shards that module with any plan and
   world size and loads the state through DCP (which reshards the codes).
"""

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.calibration import ForwardFn, default_forward
from torchrec_compress.discovery import (
    FactorCollectionHolder,
    FilterFn,
    factor_parent,
    find_embedding_bag_collections,
    table_owners,
)
from torchrec_compress.distributed.tables import (
    RowRange,
    check_compressed_state,
    gather_rows,
    global_lookup_pairs,
    local_blocks,
    row_ranges,
    row_sharded_tensor,
    save_compressed_state,
)
from torchrec_compress.methods.pq import stratified_rows
from torchrec_compress.methods.pq.config import MECConfig
from torchrec_compress.methods.pq.handler import PQHandler
from torchrec_compress.methods.pq.metrics import code_usage
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.quantizer import code_dtype
from torchrec_compress.methods.pq.training import counts_of
from torchrec_compress.registry import handler_for
from torchrec_compress.report import CompressionReport, ReportRow


def _sample_ids(
    num_rows: int,
    train_rows: int,
    seed: int,
    pairs: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sorted distinct row ids, and the rows each stands for, on every process: the
    most looked-up rows whole, a uniform draw of the others (:func:`stratified_rows`)."""
    known, counts = pairs if pairs is not None else (torch.zeros(0, dtype=torch.long),) * 2
    generator = torch.Generator().manual_seed(seed)
    return stratified_rows(num_rows, known, counts, train_rows, generator)


def _global_usage(
    codes: Mapping[int, torch.Tensor], num_subspaces: int, ksub: int, group: Any
) -> torch.Tensor:
    """``[M, K]`` codeword usage of a table's codes, summed over the processes holding them."""
    total = torch.zeros(num_subspaces, ksub, dtype=torch.float64)
    for part in codes.values():
        total += code_usage(part, ksub)
    dist.all_reduce(total, group=group)
    return total


def _columns(rows: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return rows if order is None else rows[:, order.to(rows.device)]


def _check_whole_rows(layout: list[RowRange], name: str) -> None:
    if any(len(r.blocks) != 1 for r in layout):
        raise ValueError(
            f"table {name!r} is sharded by columns; MEC encodes whole rows: shard the original "
            "table table_wise, row_wise or data_parallel before compressing it"
        )


def compress_sharded_pq(
    model: DistributedModelParallel,
    meta_model: nn.Module,
    config: MECConfig,
    calibration: Iterable[Any] | None,
    checkpoint_dir: str,
    forward_fn: ForwardFn = default_forward,
    filter_fn: FilterFn | None = None,
    train_rows: int | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Product-quantizes the tables of a DMP-sharded model without gathering any table.

    Deprecated: use ``torchrec_compress.compress_(model, config, calibration)`` and the report's
    ``reshard(device)`` (or ``save(checkpoint_dir)``), the same for every method.

    Collective: every process calls it with the same arguments and its own calibration batches.

    Args:
        model (DistributedModelParallel): the trained, sharded original (tables sharded by whole
            rows: table-, row-wise or data-parallel).
        meta_model (nn.Module): the same architecture, unsharded, on the meta device; its
            ``EmbeddingBagCollection`` s are replaced in place by ``PQEmbeddingBagCollection`` s.
            In a low-rank model (a ``FactorCollectionHolder``, e.g. from
            :func:`~torchrec_compress.methods.lowrank.sharded_driver.compress_sharded`) the factor tables are
            quantized, their columns reordered by :func:`~torchrec_compress.methods.pq.subspace_order`
            and the projections with them.
        config (MECConfig): ``mode="mec"`` (contrastive, balanced codes) or ``"pq"`` (weighted
            k-means); per-table overrides; ``skip`` is not supported here.
        calibration (Optional[Iterable]): this process's batches for the lookup counts
            (required with ``popularity_weighting``).
        checkpoint_dir (str): where the compressed state is saved (DCP).
        forward_fn (Callable): how to run ``model`` on one batch.
        filter_fn (Optional[Callable]): ``(module, fqn) -> bool`` selecting the collections.
        train_rows (Optional[int]): rows per table gathered to train its quantizer (bounded:
            the table itself never travels); default the table's
            ``KMeansTraining.kmeans_sample_size``, the rows the local driver's k-means sees.

    Returns:
        Tuple[nn.Module, CompressionReport]: ``meta_model`` (compressed, on meta) and the report.

    Example::

        >>> # 2 processes: see tests/distributed/test_mec_sharded.py
        >>> # compressed, report = compress_sharded_pq(dmp, meta_model, MECConfig(), batches, "ckpt")
        >>> # sharded = shard_model(compressed, device); load the checkpoint into it
    """
    warnings.warn(
        "compress_sharded_pq is deprecated: use torchrec_compress.compress_(dmp, config, "
        "calibration) and report.reshard(device) or report.save(checkpoint_dir)",
        DeprecationWarning,
        stacklevel=2,
    )
    compressed, state, report = sharded_pq_state(
        model, meta_model, config, calibration, forward_fn, filter_fn, train_rows
    )
    save_compressed_state(state, checkpoint_dir)
    return compressed, report


def sharded_pq_state(
    model: DistributedModelParallel,
    meta_model: nn.Module,
    config: MECConfig,
    calibration: Iterable[Any] | None,
    forward_fn: ForwardFn = default_forward,
    filter_fn: FilterFn | None = None,
    train_rows: int | None = None,
) -> tuple[nn.Module, dict[str, Any], CompressionReport]:
    """Steps 1-3 of :func:`compress_sharded_pq`: the compressed module and its state, not saved.

    Collective.  Codes are row-sharded ``ShardedTensor`` s laid out like the original rows;
    ``torchrec_compress.compress_`` wraps the result in a
    :class:`~torchrec_compress.distributed.compression.ShardedCompressionReport`.  Arguments as
    in :func:`compress_sharded_pq`.

    Returns:
        tuple[nn.Module, dict[str, Any], CompressionReport]: ``meta_model`` with
        ``PQEmbeddingBagCollection`` s, its state dict, the report.
    """
    ebcs = find_embedding_bag_collections(meta_model, filter_fn, lowrank_factors=True)
    tables: list[tuple[str, EmbeddingBagConfig]] = [
        (fqn, t) for fqn, ebc in ebcs.items() for t in ebc.embedding_bag_configs()
    ]
    table_owners(ebcs, config.table_overrides)
    handler = handler_for(config)
    assert isinstance(handler, PQHandler)
    kept = {t.name: reason for _, t in tables if (reason := handler.keep_reason(t)) is not None}
    every_table = [t for _, t in tables]  # the report's order, as the local driver's
    ebcs, tables = _drop_kept_collections(ebcs, kept)
    pairs = _global_counts(model, ebcs, tables, config, calibration, forward_fn)

    # 2-3. per table: sample -> quantizer (rank 0, broadcast) -> local codes; a kept table
    # inside a quantized collection is stored exactly (identity codes), as the local driver does
    state = model.state_dict()
    new_state: dict[str, Any] = {
        key: value for key, value in state.items() if not any(key.startswith(f"{f}.") for f in ebcs)
    }
    rows_report = [
        _identity_table(
            state[f"{fqn}.embedding_bags.{table.name}.weight"],
            table,
            kept[table.name],
            _TableKeys(fqn, new_state),
        )
        if table.name in kept
        else _quantize_table(
            state[f"{fqn}.embedding_bags.{table.name}.weight"],
            table,
            handler,
            _SampleSpec(train_rows, pairs[table.name]),
            factor_parent(meta_model, fqn),
            _TableKeys(fqn, new_state),
        )
        for fqn, table in tables
    ]

    # 4. the compressed module on meta
    _pq_skeleton_(meta_model, ebcs, new_state)
    check_compressed_state(meta_model, new_state)
    assert all(isinstance(v, ShardedTensor) for k, v in new_state.items() if ".codes." in k), (
        "codes must be row-sharded"
    )
    by_name = {row.name: row for row in rows_report}
    report = [by_name.get(t.name) or handler.kept_row(t, kept[t.name]) for t in every_table]
    return meta_model, new_state, CompressionReport(report)


def _drop_kept_collections(
    ebcs: Mapping[str, EmbeddingBagCollection], kept: Mapping[str, str]
) -> tuple[dict[str, EmbeddingBagCollection], list[tuple[str, EmbeddingBagConfig]]]:
    """The collections to quantize and their tables: a collection whose every table is kept stays
    as it is (with a warning).  A kept table of a quantized collection is stored exactly, which
    gathers its rows: allowed only for tables kept because quantizing would not shrink them (at
    most about ``K`` rows); one kept for another reason (``M`` not dividing its dimension, an
    override's skip) may be large, so it is refused, naming it."""
    left = {
        fqn: ebc
        for fqn, ebc in ebcs.items()
        if any(t.name not in kept for t in ebc.embedding_bag_configs())
    }
    untouched = {
        fqn: [t.name for t in ebc.embedding_bag_configs()]
        for fqn, ebc in ebcs.items()
        if fqn not in left
    }
    if untouched:
        warnings.warn(
            f"product quantization keeps collection(s) {untouched} as they are: no table of "
            f"theirs would be smaller quantized ({ {n: kept[n] for t in untouched.values() for n in t} })",
            stacklevel=4,
        )
    tables = [(fqn, t) for fqn, ebc in left.items() for t in ebc.embedding_bag_configs()]
    large = {
        t.name: kept[t.name]
        for _, t in tables
        if t.name in kept and "would not be smaller" not in kept[t.name]
    }
    if large:
        raise ValueError(
            f"product quantization of a sharded model keeps single tables of a quantized "
            f"collection only when they are small (kept because quantizing would not shrink them); "
            f"it would keep {large}: leave their collections out with filter_fn, or choose a "
            "num_subspaces that divides their dimension"
        )
    return left, tables


def _identity_table(
    value: torch.Tensor, table: EmbeddingBagConfig, reason: str, out: "_TableKeys"
) -> ReportRow:
    """A small kept table stored exactly in the quantized collection (collective): one subspace
    whose ``N`` codewords are its rows (gathered: ``N`` is at most about ``K``) and identity
    codes, row-sharded like its rows."""
    group = dist.group.WORLD
    me = dist.get_rank(group)
    n, d = table.num_embeddings, table.embedding_dim
    layout = row_ranges(value, table.name, d)
    _check_whole_rows(layout, table.name)
    rows = gather_rows(value, torch.arange(n), table.name, d, group)
    dtype = code_dtype(n)
    codes = {
        r.row: torch.arange(r.row, r.row + r.rows, dtype=torch.long).unsqueeze(1).to(dtype)
        for r in layout
        if r.lead == me
    }
    out.state[f"{out.fqn}.codes.{table.name}"] = row_sharded_tensor(layout, codes, (n, 1), group)
    out.state[f"{out.fqn}.codebooks.{table.name}"] = rows.unsqueeze(0)
    return PQHandler.kept_row(table, reason, stored_exactly=True)


def _global_counts(
    model: DistributedModelParallel,
    ebcs: Mapping[str, EmbeddingBagCollection],
    tables: list[tuple[str, EmbeddingBagConfig]],
    config: MECConfig,
    calibration: Iterable[Any] | None,
    forward_fn: ForwardFn,
) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """Step 1: table name -> global sorted ``(ids, counts)`` of this group's calibration
    lookups (``None`` without popularity weighting); sparse pairs, summed over the group."""
    names = [t.name for _, t in tables]
    if not (config.popularity_weighting and tables):
        return dict.fromkeys(names)
    if calibration is None:
        raise ValueError(
            "MECConfig(popularity_weighting=True) needs calibration data for the lookup counts"
        )
    pairs = global_lookup_pairs(model, ebcs, tables, calibration, forward_fn)
    return {name: pairs[name] for name in names}


@dataclass(frozen=True)
class _SampleSpec:
    """How one table's training sample is drawn: at most ``train_rows`` rows (``None``: the
    table's ``KMeansTraining.kmeans_sample_size``, as the local driver), with its global lookup
    ``pairs`` (or ``None``)."""

    train_rows: int | None
    pairs: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class _TableKeys:
    """Where one table's compressed tensors go: ``state`` keys under the collection ``fqn``."""

    fqn: str
    state: dict[str, Any]


def _quantize_table(
    value: torch.Tensor,
    table: EmbeddingBagConfig,
    handler: PQHandler,
    spec: _SampleSpec,
    lowrank: FactorCollectionHolder | None,
    out: _TableKeys,
) -> ReportRow:
    """Steps 2-3 for one table (collective): sample, quantizer fitted on rank 0 and broadcast,
    codes of the local rows; writes codes, codebooks (and a reordered projection of a low-rank
    factor table) into ``out.state`` and returns the report row."""
    group = dist.group.WORLD
    me = dist.get_rank(group)
    layout = row_ranges(value, table.name, table.embedding_dim)
    _check_whole_rows(layout, table.name)
    blocks = local_blocks(value, me)
    training = handler.config.for_table(table.name).training
    size = spec.train_rows if spec.train_rows is not None else training.kmeans_sample_size
    # the rows, counts and seed the local driver samples with: the same quantizer (PQ)
    ids, row_scale = _sample_ids(table.num_embeddings, size, training.seed, spec.pairs)
    sample = gather_rows(value, ids, table.name, table.embedding_dim, group)
    sample_counts = counts_of(spec.pairs, ids) if spec.pairs is not None else None
    # factor tables of a low-rank model: principal components spread over the subspaces,
    # the projection's rows reordered to match (every process computes the same order)
    order = None
    if lowrank is not None and table.name in lowrank.ranks():
        order = handler.subspace_order(sample, sample_counts, table.name, row_scale)
        sample = sample[:, order]
        parent = out.fqn.rpartition(".")[0]
        for key in (f"{parent}.{k}" for k in lowrank.column_order_keys(table.name)):
            out.state[key] = out.state[key][order.to(out.state[key].device)]
    holder: list[Any] = [None]
    if me == 0:
        holder[0] = handler.fit(sample, sample_counts, table.name, row_scale)
    dist.broadcast_object_list(holder, src=0, group=group)
    quantizer = holder[0]
    codebooks = handler.codebooks(quantizer)
    codes = {
        rows.row: handler.encode(quantizer, _columns(blocks[(rows.row, 0)], order), table.name)
        for rows in layout
        if rows.lead == me
    }
    num_subspaces, ksub, _ = codebooks.shape
    out.state[f"{out.fqn}.codes.{table.name}"] = row_sharded_tensor(
        layout, codes, (table.num_embeddings, num_subspaces), group
    )
    out.state[f"{out.fqn}.codebooks.{table.name}"] = codebooks
    return handler.table_row(table, codebooks, _global_usage(codes, num_subspaces, ksub, group))


def _pq_skeleton_(
    meta_model: nn.Module, ebcs: Mapping[str, EmbeddingBagCollection], state: Mapping[str, Any]
) -> None:
    """Swaps every collection of ``ebcs`` in ``meta_model`` for a ``PQEmbeddingBagCollection``
    on ``meta`` shaped like the codes and codebooks in ``state`` (inside its low-rank parent
    when it holds factor tables)."""
    meta = torch.device("meta")
    for fqn, ebc in ebcs.items():
        configs = ebc.embedding_bag_configs()
        books = {t.name: state[f"{fqn}.codebooks.{t.name}"] for t in configs}
        codes_meta = {
            t.name: torch.empty(
                t.num_embeddings,
                books[t.name].shape[0],
                dtype=code_dtype(books[t.name].shape[1]),
                device=meta,
            )
            for t in configs
        }
        books_meta = {name: torch.empty(b.shape, device=meta) for name, b in books.items()}
        module: nn.Module = PQEmbeddingBagCollection(
            configs, codes_meta, books_meta, ebc.is_weighted()
        )
        lowrank = factor_parent(meta_model, fqn)
        if lowrank is not None:
            # a low-rank collection over PQ factors has its own type (DMP shards inside it)
            fqn, module = fqn.rpartition(".")[0], lowrank.with_factor_collection(module)
        parent, _, child = fqn.rpartition(".")
        setattr(meta_model.get_submodule(parent), child, module)
