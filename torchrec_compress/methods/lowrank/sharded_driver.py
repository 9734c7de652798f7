"""Low-rank (AFM/SVD) models under ``DistributedModelParallel``, and distributed compression.

A :class:`~torchrec_compress.LowRankEmbeddingBagCollection` needs no sharder of its own:
DMP walks into it and shards its ``factor_ebc`` (an ordinary EBC of rows x k tables) with
TorchRec's EBC sharder, so the planner sizes the factor tables at their true rows x k.

:func:`lowrank_skeleton_` swaps modules for empty low-rank ones of given ranks (on ``meta``: no
memory), e.g. to plan a compressed model for a cluster that does not exist yet.

:func:`sharded_lowrank_state` compresses a DMP-sharded model where it lies (the AFM/SVD route of
``torchrec_compress.compress_`` on a ``DistributedModelParallel`` model): lookup counts travel as
``(id, count)`` pairs, moments are computed per shard and summed, factor rows are computed by
the processes holding the rows, and the result is the compressed state, which a DCP checkpoint
carries to any later plan and world size.  No process ever holds a whole table.  Costs that grow with the data,
not the tables: every process receives all processes' distinct ``(id, count)`` pairs (one
all-gather); column-split tables move their counted rows (statistics) and all their rows'
k-dim partial factors (``chunk_rows`` at a time) to the first column owner.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.calibration import ForwardFn, calibration_pass, default_forward
from torchrec_compress.discovery import (
    FilterFn,
    find_embedding_bag_collections,
    find_mlp_hidden_linears,
    table_owners,
)
from torchrec_compress.distributed.tables import (
    RowRange,
    SparseLookupCounter,
    all_gather_counts,
    check_compressed_state,
    dense_counts,
    local_blocks,
    lookup_counting_modules,
    row_ranges,
    row_sharded_tensor,
    save_compressed_state,
    sum_identical_,
)
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankConfig, SVDConfig
from torchrec_compress.methods.lowrank.factors import (
    PrincipalBasis,
    factor_table,
    projection,
)
from torchrec_compress.methods.lowrank.handler import LowRankHandler, linear_factors
from torchrec_compress.methods.lowrank.linear import LowRankLinear
from torchrec_compress.methods.lowrank.module import (
    LowRankEmbeddingBagCollection,
    pack_factor_rows,
)
from torchrec_compress.methods.lowrank.rank import rows_per_packed_row
from torchrec_compress.moments import DEFAULT_CHUNK_ROWS, Moments, moments_from_counts
from torchrec_compress.registry import handler_for
from torchrec_compress.report import CompressionReport

# the checkpoint entry (beside "model") that holds a compressed model's layout as JSON


def lowrank_skeleton_(
    model: nn.Module,
    table_ranks: Mapping[str, int],
    linear_ranks: Mapping[str, int] | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """Swaps modules of ``model`` in place for uninitialised low-rank ones of the given ranks.

    Every ``EmbeddingBagCollection`` holding a table named in ``table_ranks`` becomes a
    :class:`LowRankEmbeddingBagCollection` (other tables of it stay full width inside
    ``factor_ebc``); every ``nn.Linear`` whose fully qualified name is in ``linear_ranks``
    becomes a :class:`LowRankLinear`.  Nothing is computed: the new modules are placeholders
    whose weights come from a checkpoint, which is what planning and DCP loading need.  For
    every method and chain (PQ codes, int8 rows, AFM+MEC), by module path, see
    :func:`torchrec_compress.layout.restore_layout_`.

    Args:
        model (nn.Module): the module tree (typically on ``meta``); not the swapped module itself.
        table_ranks (Mapping[str, int]): table name -> rank k.
        linear_ranks (Optional[Mapping[str, int]]): Linear fqn -> rank.
        device (Optional[torch.device]): where the new modules live (default: ``meta``).

    Returns:
        nn.Module: ``model``.

    Example::

        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=10**9,
        ...                          feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg], device=torch.device("meta")))
        >>> _ = lowrank_skeleton_(model, {"t": 16})
        >>> model[0].factor_ebc.embedding_bags["t"].weight.shape
        torch.Size([1000000000, 16])
    """
    device = device if device is not None else torch.device("meta")
    linear_ranks = dict(linear_ranks or {})
    replacements: dict[str, nn.Module] = {}
    seen: set[str] = set()
    for fqn, ebc in find_embedding_bag_collections(model).items():
        tables = ebc.embedding_bag_configs()
        ranks = {t.name: table_ranks[t.name] for t in tables if t.name in table_ranks}
        seen.update(ranks)
        if ranks:
            replacements[fqn] = LowRankEmbeddingBagCollection(
                tables, ranks, ebc.is_weighted(), device
            )
    unknown = sorted(set(table_ranks) - seen)
    if unknown:
        raise ValueError(f"table_ranks name table(s) {unknown} that no EmbeddingBagCollection has")
    for fqn, rank in linear_ranks.items():
        layer = model.get_submodule(fqn)
        if type(layer) is not nn.Linear:
            raise ValueError(f"linear_ranks: {fqn!r} is a {type(layer).__name__}, not nn.Linear")
        replacements[fqn] = LowRankLinear(
            layer.in_features, rank, layer.out_features, layer.bias is not None, device
        )
    if "" in replacements:
        raise ValueError("cannot replace the model itself in place; wrap it in a parent module")
    for fqn, module in replacements.items():
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model


# --------------------------------------------------------------------------------------------
# Distributed compression
# --------------------------------------------------------------------------------------------


def _range_moments(
    rows: RowRange,
    local: Mapping[tuple[int, int], torch.Tensor],
    counts: torch.Tensor,
    dim: int,
    chunk_rows: int,
    name: str,
) -> Moments:
    """This process's part of one row range's moments (non-zero only on the range's lead).

    Column-split rows: the lead assembles full rows from the column owners, only for rows with
    a non-zero count and ``chunk_rows`` at a time (point-to-point between the owners of this
    range; every process walks ranges in the same order, so the sends and receives pair up).
    """
    me = dist.get_rank()
    moments = Moments.zeros(dim)
    if me not in rows.ranks:
        return moments
    if len(rows.blocks) == 1:
        return moments_from_counts(local[(rows.row, 0)], counts, 0, chunk_rows, name)
    dtype = next(iter(local.values())).dtype
    used = counts.nonzero().squeeze(1)
    for start in range(0, used.numel(), chunk_rows):
        index = used[start : start + chunk_rows]
        if me != rows.lead:
            for block in rows.blocks:
                if block.rank == me:
                    dist.send(local[(rows.row, block.col)][index].contiguous(), dst=rows.lead)
            continue
        full = torch.empty(index.numel(), dim, dtype=torch.float64)
        for block in rows.blocks:
            if block.rank == me:
                part = local[(rows.row, block.col)][index]
            else:
                part = torch.empty(index.numel(), block.cols, dtype=dtype)
                dist.recv(part, src=block.rank)
            full[:, block.col : block.col + block.cols] = part
        if not torch.isfinite(full).all():
            raise ValueError(
                f"{name}: a weight row in {rows.row}..{rows.row + rows.rows} is not finite"
            )
        moments.update(full, counts[index])
    return moments


def _range_factors(
    rows: RowRange,
    local: Mapping[tuple[int, int], torch.Tensor],
    basis: PrincipalBasis,
    rank: int,
    chunk_rows: int,
) -> torch.Tensor | None:
    """Factor rows ``A = (E - mu) U_k`` of one row range, on its lead (``None`` elsewhere).

    Column-split rows: ``A`` is the sum over column blocks of ``(E_c - mu_c) U_k[c]``; each
    owner computes its blocks' part in float64 and sends it to the lead, ``chunk_rows`` rows
    at a time.
    """
    me = dist.get_rank()
    if me not in rows.ranks:
        return None
    if len(rows.blocks) == 1:
        return factor_table(local[(rows.row, 0)], basis, rank, chunk_rows)
    directions = basis.eigenvectors[:, :rank]
    dtype = next(iter(local.values())).dtype
    others = sorted(rows.ranks - {rows.lead})
    out = torch.empty(rows.rows, rank, dtype=dtype) if me == rows.lead else None
    for start in range(0, rows.rows, chunk_rows):
        n = min(chunk_rows, rows.rows - start)
        partial = torch.zeros(n, rank, dtype=torch.float64)
        for block in rows.blocks:
            if block.rank == me:
                cols = slice(block.col, block.col + block.cols)
                part = local[(rows.row, block.col)][start : start + n].to(torch.float64)
                partial += (part - basis.mean[cols]) @ directions[cols]
        if out is None:
            dist.send(partial, dst=rows.lead)
            continue
        for other in others:
            received = torch.empty_like(partial)
            dist.recv(received, src=other)
            partial += received
        out[start : start + n] = partial.to(dtype)
    return out


def local_table_moments(
    value: torch.Tensor,
    table: EmbeddingBagConfig,
    pairs: tuple[torch.Tensor, torch.Tensor] | None,
    chunk_rows: int,
) -> Moments:
    """This process's part of one table's moments (collective over the table's column owners):
    rows weighted by their global lookup counts ``pairs`` (AFM), or uniformly (SVD, or a table
    the calibration data never looked up, with a warning)."""
    layout = row_ranges(value, table.name, table.embedding_dim)
    blocks = local_blocks(value, dist.get_rank())
    uniform = pairs is None or pairs[1].sum() <= 0
    if pairs is not None and uniform:
        warnings.warn(
            f"table {table.name!r} has no lookups in the calibration data; AFM falls back "
            "to uniform row weights for it",
            stacklevel=4,
        )
    total = Moments.zeros(table.embedding_dim)
    for rows in layout:
        if pairs is None or uniform:
            counts = torch.ones(rows.rows, dtype=torch.float64)
        else:
            counts = dense_counts(pairs[0], pairs[1], rows.row, rows.rows)
        label = f"table {table.name!r}"
        total.add_(_range_moments(rows, blocks, counts, table.embedding_dim, chunk_rows, label))
    return total


@dataclass
class ShardedStatistics:
    """What :func:`sharded_statistics` collected; identical on every process.

    Args:
        tables (list[tuple[str, EmbeddingBagConfig]]): (EBC fqn, table config) of each
            selected table, in model order.
        linears (dict[str, nn.Linear]): fqn -> selected Linear layer (of ``meta_model``).
        table_moments (dict[str, Moments]): table name -> AFM (lookup-weighted) or SVD
            (uniform) moments of its rows, summed over the group.
        linear_moments (dict[str, Moments]): Linear fqn -> output moments (AFM only).
    """

    tables: list[tuple[str, EmbeddingBagConfig]]
    linears: dict[str, nn.Linear]
    table_moments: dict[str, Moments]
    linear_moments: dict[str, Moments]


def sharded_statistics(
    model: DistributedModelParallel,
    meta_model: nn.Module,
    config: LowRankConfig,
    calibration: Iterable[Any] | None,
    forward_fn: ForwardFn = default_forward,
    filter_fn: FilterFn | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ShardedStatistics:
    """Steps 1 and 2 of :func:`compress_sharded`: counts, per-shard moments, summed.

    Collective.  Equal (up to float64 rounding) to the single-process statistics of
    ``compress_`` over the union of all processes' calibration batches.  Arguments as in
    :func:`compress_sharded`.
    """
    if not isinstance(config, (AFMConfig, SVDConfig)):
        raise TypeError(
            f"compress_sharded supports AFMConfig and SVDConfig, got {type(config).__name__}"
        )
    is_afm = isinstance(config, AFMConfig)
    group = dist.group.WORLD
    inner = model.module if isinstance(model, DistributedModelParallel) else model
    ebcs = find_embedding_bag_collections(meta_model, filter_fn) if config.embeddings else {}
    linears = (
        find_mlp_hidden_linears(meta_model, config.keep_mlp_ends, filter_fn)
        if config.linear
        else {}
    )
    tables = [(fqn, t) for fqn, ebc in ebcs.items() for t in ebc.embedding_bag_configs()]
    table_owners(ebcs, config.table_overrides)
    names = [t.name for _, t in tables]

    # 1. calibration pass: sparse lookup counts and Linear output moments
    counters = {
        fqn: SparseLookupCounter(ebc.embedding_bag_configs(), ebc.is_weighted())
        for fqn, ebc in ebcs.items()
    }
    linear_moments: dict[str, Moments] = {}
    if is_afm and (ebcs or linears):
        if calibration is None:
            raise ValueError("AFMConfig needs calibration data (an iterable of batches)")
        linear_moments = calibration_pass(
            model,
            calibration,
            forward_fn,
            lookup_counting_modules(inner, counters),
            {fqn: inner.get_submodule(fqn) for fqn in linears},
        )
    global_counts = dict(
        zip(
            names,
            all_gather_counts([counters[fqn].counts()[t.name] for fqn, t in tables], group)
            if is_afm
            else [None] * len(names),
            strict=True,
        )
    )

    # 2. moments per shard, summed over the group
    state = model.state_dict()
    moments = {
        t.name: local_table_moments(
            state[f"{fqn}.embedding_bags.{t.name}.weight"], t, global_counts[t.name], chunk_rows
        )
        for fqn, t in tables
    }
    sum_identical_(
        [
            t
            for m in [*moments.values(), *linear_moments.values()]
            for t in (m.count, m.sum, m.sum_outer)
        ],
        group,
    )

    return ShardedStatistics(tables, dict(linears), moments, linear_moments)


def compress_sharded(
    model: DistributedModelParallel,
    meta_model: nn.Module,
    config: LowRankConfig,
    calibration: Iterable[Any] | None,
    checkpoint_dir: str,
    forward_fn: ForwardFn = default_forward,
    filter_fn: FilterFn | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[nn.Module, CompressionReport]:
    """AFM/SVD compression of a DMP-sharded model without gathering any table on one process.

    Deprecated: use ``torchrec_compress.compress_(model, config, calibration)`` and the report's
    ``reshard(device)`` (or ``save(checkpoint_dir)``), the same for every method; this wrapper
    needs a ``meta_model`` and always writes a checkpoint.

    Collective: every process of the default group calls it with its own calibration batches.

    1. Lookup counts: a pre-hook on each sharded EBC counts the ids of the local batches as
       ``(id, count)`` pairs (:class:`SparseLookupCounter`); the pairs are all-gathered (only
       touched ids travel, never an N-length vector) and each process keeps its shards' rows.
    2. Moments per shard, summed over the group: row shards add; a table-wise table is counted
       by its owner; column-split rows are assembled on the range's first column owner in
       chunks of ``chunk_rows`` (counted rows only).  Linear layers: forward hooks on the
       replicated dense modules, moments summed over the group.
    3. Every process factorises the same summed moments (broadcast from rank 0, so bit
       identical), selects ranks with the config's rule, and computes the factor rows
       ``A = (E - mu) U_k`` of the row ranges it leads (column-split: summed over the column
       owners).  Linear layers are factorised from the replicated weights.
    4. A DCP checkpoint of the compressed model's state, ``{"model": state_dict}`` (the layout
       of ``examples/dlrm/train.py``'s ``save_checkpoint``), is written to ``checkpoint_dir``:
       factor tables as row-sharded ``ShardedTensor``\\ s, projections, means and dense
       parameters replicated; tables left uncompressed keep their original shards.

    The caller then shards the returned module with any plan and world size (attach fused
    optimizers first) and loads the checkpoint, which DCP reshards::

        compressed, report = compress_sharded(dmp, meta_model, AFMConfig(rank=16), batches, path)
        sharded = shard_model(compressed, device)
        state = {"model": sharded.state_dict()}
        dcp.load(state, checkpoint_id=path)
        sharded.load_state_dict(state["model"])

    Args:
        model (DistributedModelParallel): the trained, sharded model (left unchanged).
        meta_model (nn.Module): the same architecture unsharded (typically on ``meta``); its
            modules are swapped in place for low-rank ones and it is returned.
        config (LowRankConfig): :class:`AFMConfig` or :class:`SVDConfig` (same fields and rank
            rules as :func:`~torchrec_compress.compress_`).
        calibration (Optional[Iterable]): this process's batches (AFM); ignored by SVD.
        checkpoint_dir (str): where the compressed state is written.
        forward_fn (Callable[[nn.Module, Any], Any]): runs ``model`` on one batch.
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): as in ``compress_``.
        chunk_rows (int): rows per message / float64 working block.

    Returns:
        tuple[nn.Module, CompressionReport]: ``meta_model`` with compressed modules, and the
        report (identical on every process).
    """
    warnings.warn(
        "compress_sharded is deprecated: use torchrec_compress.compress_(dmp, config, "
        "calibration) and report.reshard(device) or report.save(checkpoint_dir)",
        DeprecationWarning,
        stacklevel=2,
    )
    compressed, state, report = sharded_lowrank_state(
        model, meta_model, config, calibration, forward_fn, filter_fn, chunk_rows
    )
    save_compressed_state(state, checkpoint_dir)
    return compressed, report


def sharded_lowrank_state(
    model: DistributedModelParallel,
    meta_model: nn.Module,
    config: LowRankConfig,
    calibration: Iterable[Any] | None,
    forward_fn: ForwardFn = default_forward,
    filter_fn: FilterFn | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[nn.Module, dict[str, Any], CompressionReport]:
    """Steps 1-3 of :func:`compress_sharded`: the compressed module and its state, not saved.

    Collective.  The state holds the factor tables as row-sharded ``ShardedTensor`` s laid out
    like the original rows, and the dense parameters (shared with ``model``, not copied);
    ``torchrec_compress.compress_`` wraps it in a
    :class:`~torchrec_compress.distributed.compression.ShardedCompressionReport`.  Arguments as
    in :func:`compress_sharded`.

    Returns:
        tuple[nn.Module, dict[str, Any], CompressionReport]: ``meta_model`` with low-rank
        modules, its state dict (keys equal to ``meta_model.state_dict()``'s), the report.
    """
    statistics = sharded_statistics(
        model, meta_model, config, calibration, forward_fn, filter_fn, chunk_rows
    )
    tables, linears = statistics.tables, statistics.linears
    inner = model.module if isinstance(model, DistributedModelParallel) else model
    state = model.state_dict()

    # 3. identical bases and ranks everywhere (the method's handler, as in the local driver);
    # factor rows of the ranges this process leads
    handler = handler_for(config)
    assert isinstance(handler, LowRankHandler)
    bases, choices = handler.fit([t for _, t in tables], statistics.table_moments)
    table_ranks = {name: c.rank for name, c in choices.items() if c.rank is not None}
    compressed_ebcs = {fqn for fqn, t in tables if t.name in table_ranks}
    new_state: dict[str, Any] = {
        key: value
        for key, value in state.items()
        if not any(key.startswith(f"{fqn}.") for fqn in compressed_ebcs)
    }
    rows_report = [handler.table_row(t, bases[t.name], choices[t.name]) for _, t in tables]
    for fqn, table in tables:
        if fqn in compressed_ebcs:
            weight = state[f"{fqn}.embedding_bags.{table.name}.weight"]
            k = choices[table.name].rank
            new_state.update(_table_state(weight, fqn, table, bases[table.name], k, chunk_rows))

    linear_ranks: dict[str, int] = {}
    for fqn in linears:
        moments = statistics.linear_moments.get(fqn) if handler.needs_lookup_counts else None
        row, new = linear_factors(fqn, inner.get_submodule(fqn), moments, config)
        rows_report.append(row)
        if new is None:
            continue
        linear_ranks[fqn] = new.rank
        for key in [k for k in new_state if k.startswith(f"{fqn}.")]:
            del new_state[key]
        new_state.update({f"{fqn}.{key}": value for key, value in new.state_dict().items()})

    # 4. the compressed module (on meta) and its state
    lowrank_skeleton_(meta_model, table_ranks, linear_ranks)
    check_compressed_state(meta_model, new_state)
    return meta_model, new_state, CompressionReport(rows_report)


def _table_state(
    weight: torch.Tensor,
    fqn: str,
    table: EmbeddingBagConfig,
    basis: PrincipalBasis,
    rank: int | None,
    chunk_rows: int,
) -> dict[str, Any]:
    """The state entries of one table of a collection that becomes low-rank (collective): its
    row-sharded factor table, projection and mean, or (``rank`` ``None``) its original weight
    kept at full width inside ``factor_ebc``."""
    weight_key = f"{fqn}.factor_ebc.embedding_bags.{table.name}.weight"
    if rank is None:
        return {weight_key: weight}
    layout = row_ranges(weight, table.name, table.embedding_dim)
    local = local_blocks(weight, dist.get_rank())
    factors = {}
    for rows in layout:
        part = _range_factors(rows, local, basis, rank, chunk_rows)
        if part is not None and dist.get_rank() == rows.lead:
            factors[rows.row] = part
    layout, factors, shape = _packed(layout, factors, table, rank)
    return {
        weight_key: row_sharded_tensor(layout, factors, shape, dist.group.WORLD),
        f"{fqn}.projection.{table.name}": projection(basis, rank),
        f"{fqn}.mean.{table.name}": basis.mean.to(torch.float32).unsqueeze(0),
    }


def _packed(
    layout: list[RowRange],
    factors: dict[int, torch.Tensor],
    table: EmbeddingBagConfig,
    rank: int,
) -> tuple[list[RowRange], dict[int, torch.Tensor], tuple[int, int]]:
    """The row ranges, local factor rows and shape of a factor table as stored (collective):
    unchanged for a rank that is a multiple of 4, else ``p`` rows to a stored row
    (``pack_factor_rows``).  A row range that starts inside a stored row (the original table's
    row shards need not start at multiples of ``p``, e.g. 50 rows on 2 processes) hands its
    first rows to the range before it (:func:`_realigned`), so that each range packs whole
    stored rows where it lives."""
    p = rows_per_packed_row(rank)
    if p == 1:
        return layout, factors, (table.num_embeddings, rank)
    layout, factors = _realigned(layout, factors, p, table.num_embeddings, rank)
    packed_layout = [RowRange(r.row // p, -(-r.rows // p), r.blocks) for r in layout]
    packed = {row // p: pack_factor_rows(part, p) for row, part in factors.items()}
    return packed_layout, packed, (-(-table.num_embeddings // p), p * rank)


def _realigned(
    layout: list[RowRange],
    factors: dict[int, torch.Tensor],
    p: int,
    num_rows: int,
    rank: int,
) -> tuple[list[RowRange], dict[int, torch.Tensor]]:
    """Row ranges moved to start at multiples of ``p`` (collective; point to point).

    Range ``i`` keeps its lead and now covers ``[ceil(start_i / p) p, ceil(start_{i+1} / p) p)``:
    the rows in between move from their old lead to their new one, in the same order on every
    process.  Only the few rows at each boundary travel; a range left empty holds no rows.
    """
    if all(r.row % p == 0 for r in layout):
        return layout, factors
    me = dist.get_rank()
    starts = [0] + [min(-(-r.row // p) * p, num_rows) for r in layout[1:]]
    ends = [*starts[1:], num_rows]
    moved: dict[int, torch.Tensor] = {}
    dtype = next(iter(factors.values())).dtype if factors else torch.float32
    for new, start, end in zip(layout, starts, ends, strict=True):
        pieces = []
        for old in layout:
            lo, hi = max(start, old.row), min(end, old.row + old.rows)
            if lo >= hi:
                continue
            if old.lead == new.lead:
                if me == new.lead:
                    pieces.append(factors[old.row][lo - old.row : hi - old.row])
            elif me == old.lead:
                dist.send(factors[old.row][lo - old.row : hi - old.row].contiguous(), new.lead)
            elif me == new.lead:
                received = torch.empty(hi - lo, rank, dtype=dtype)
                dist.recv(received, old.lead)
                pieces.append(received)
        if me == new.lead and pieces:
            moved[start] = torch.cat(pieces)
    realigned = [
        RowRange(start, end - start, r.blocks)
        for r, start, end in zip(layout, starts, ends, strict=True)
        if end > start
    ]
    return realigned, moved
