"""``compress_``: compress a model's embedding tables and MLP layers in place, torchao-style.

``compress_(model, AFMConfig(rank=8), calibration=batches)`` finds every
``EmbeddingBagCollection`` (and, if asked, the hidden ``nn.Linear`` layers of MLPs), collects
statistics in one pass over the calibration data, factorises, and only then swaps the modules:
if anything fails (bad rank, unknown table, NaN) the model is left unchanged.

Each config type maps to a *planner* in :data:`CONVERTERS`: a function that inspects the
model (never mutating it) and returns a :class:`ConversionPlan` (fully qualified name -> new
module, plus report rows).  ``compress_`` applies plans atomically, so adding a method is one
entry in that dict.  Planners share :func:`find_embedding_bag_collections` and
:func:`calibrate` (lookup counts and Linear output moments in one pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.config import (
    AFMConfig,
    CompressionConfig,
    LowRankConfig,
    MECConfig,
    SVDConfig,
)
from torchrec_compress.lowrank import (
    PrincipalBasis,
    afm_basis,
    afm_linear,
    factor_table,
    projection,
    svd_basis,
    svd_linear,
    table_moments,
)
from torchrec_compress.modules.lowrank_embedding_bag import LowRankEmbeddingBagCollection
from torchrec_compress.modules.lowrank_linear import LowRankLinear
from torchrec_compress.modules.pq_embedding_bag import PQEmbeddingBagCollection
from torchrec_compress.pq import QuantizationMetrics, code_dtype, subspace_order, train_pq_table
from torchrec_compress.rank import (
    TableSpectrum,
    check_rank,
    compressed_table_bytes,
    explained_variance_ratio,
    rank_for_variance,
    select_ranks,
)
from torchrec_compress.statistics import LinearOutputCollector, LookupCounter, Moments

FilterFn = Callable[[nn.Module, str], bool]
ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Batch | KeyedJaggedTensor) -> Any:
    """``model(dense, sparse)`` for a ``Batch`` (torchrec DLRM's signature), else ``model(kjt)``."""
    if isinstance(batch, Batch):
        return model(batch.dense_features, batch.sparse_features)
    return model(batch)


@dataclass
class ReportRow:
    """One compressed (or inspected and kept) table or layer."""

    name: str
    kind: str  # "table" or "linear"
    shape: tuple[int, ...]
    method: str  # e.g. "AFM", "SVD", or "kept" when left uncompressed
    rank: int | None
    bytes_before: int
    bytes_after: int
    explained_variance: float | None
    # PQ tables: mean over subspaces of the codebook usage perplexity (every row counted once).
    perplexity: float | None = None


@dataclass
class CompressionReport:
    """What ``compress_`` did, one row per table / layer; ``str()`` prints a table."""

    rows: list[ReportRow] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def compression_ratio(self) -> float:
        """``bytes_before / bytes_after`` over all rows."""
        return self.bytes_before / max(self.bytes_after, 1)

    def followed_by(self, later: CompressionReport) -> CompressionReport:
        """One report for this compression and ``later``, applied to its result.

        Rows are matched by (kind, name): bytes run from this report's ``bytes_before`` to what
        ``later`` left (``after - later.before + later.after``); methods join as ``"AFM+MEC"``;
        the rank and explained variance come from here, the perplexity from ``later``.

        Example::

            >>> afm = CompressionReport([ReportRow("t", "table", (100, 64), "AFM", 16, 25600, 6656, 0.9)])
            >>> mec = CompressionReport([ReportRow("t", "table", (100, 16), "MEC", 8, 6400, 1312, None, 200.0)])
            >>> row = afm.followed_by(mec).rows[0]
            >>> row.method, row.bytes_before, row.bytes_after
            ('AFM+MEC', 25600, 1568)
        """
        by_key = {(r.kind, r.name): r for r in later.rows}
        unknown = sorted(set(by_key) - {(r.kind, r.name) for r in self.rows})
        if unknown:
            raise ValueError(f"later report has rows {unknown} that this report does not")
        rows = []
        for r in self.rows:
            nxt = by_key.get((r.kind, r.name))
            if nxt is None or nxt.method == "kept":
                rows.append(r)
                continue
            rows.append(
                ReportRow(
                    name=r.name,
                    kind=r.kind,
                    shape=r.shape,
                    method=nxt.method if r.method == "kept" else f"{r.method}+{nxt.method}",
                    rank=r.rank,
                    bytes_before=r.bytes_before,
                    bytes_after=r.bytes_after - nxt.bytes_before + nxt.bytes_after,
                    explained_variance=r.explained_variance,
                    perplexity=nxt.perplexity,
                )
            )
        return CompressionReport(rows)

    def __str__(self) -> str:
        header = (
            "name",
            "kind",
            "shape",
            "method",
            "rank",
            "bytes before",
            "bytes after",
            "expl.var",
        )
        lines = [
            (
                r.name,
                r.kind,
                "x".join(map(str, r.shape)),
                r.method,
                "-" if r.rank is None else str(r.rank),
                f"{r.bytes_before:,}",
                f"{r.bytes_after:,}",
                "-" if r.explained_variance is None else f"{r.explained_variance:.4f}",
            )
            for r in self.rows
        ]
        if any(r.perplexity is not None for r in self.rows):
            header = (*header, "perplexity")
            lines = [
                (*line, "-" if r.perplexity is None else f"{r.perplexity:.1f}")
                for line, r in zip(lines, self.rows, strict=True)
            ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        total = (
            f"total: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
            f"({self.compression_ratio:.2f}x smaller)"
        )
        return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in lines), total])


@dataclass
class ConversionPlan:
    """What a planner wants swapped: fully qualified name -> new module, and report rows."""

    replacements: dict[str, nn.Module]
    rows: list[ReportRow]


Planner = Callable[
    [nn.Module, CompressionConfig, Iterable[Any] | None, FilterFn | None, ForwardFn],
    ConversionPlan,
]


def find_embedding_bag_collections(
    model: nn.Module, filter_fn: FilterFn | None = None, lowrank_factors: bool = False
) -> dict[str, EmbeddingBagCollection]:
    """Every ``EmbeddingBagCollection`` in ``model`` by fully qualified name, excluding those
    ``filter_fn(module, fqn)`` rejects and those already inside a compressed module, except,
    with ``lowrank_factors``, the factor tables of a ``LowRankEmbeddingBagCollection``
    (``<fqn>.factor_ebc``, which product quantization can compress further)."""
    found: dict[str, EmbeddingBagCollection] = {}

    def visit(module: nn.Module, fqn: str) -> None:
        if isinstance(module, EmbeddingBagCollection):
            if filter_fn is None or filter_fn(module, fqn):
                found[fqn] = module
            return
        if isinstance(module, LowRankEmbeddingBagCollection):
            if lowrank_factors and isinstance(module.factor_ebc, EmbeddingBagCollection):
                visit(module.factor_ebc, f"{fqn}.factor_ebc" if fqn else "factor_ebc")
            return
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    return found


def find_mlp_hidden_linears(
    model: nn.Module, keep_mlp_ends: bool = True, filter_fn: FilterFn | None = None
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of MLPs, by fully qualified name.

    An MLP is an outermost ``nn.Sequential`` holding two or more ``nn.Linear`` layers at any
    depth (``torchrec.modules.mlp.MLP`` is a Sequential of ``Perceptron``\\ s; DLRM's over arch
    is a Sequential of an MLP and a final Linear, one MLP of all their layers).  Its layers
    are taken in module order; with ``keep_mlp_ends`` the first and last are left out.
    Layers inside an existing ``LowRankLinear`` are never selected.
    """
    found: dict[str, nn.Linear] = {}

    def linears(module: nn.Module, fqn: str) -> list[tuple[str, nn.Linear]]:
        if isinstance(module, LowRankLinear):
            return []
        if type(module) is nn.Linear:
            return [(fqn, module)]
        return [
            item
            for name, child in module.named_children()
            for item in linears(child, f"{fqn}.{name}" if fqn else name)
        ]

    def visit(module: nn.Module, fqn: str) -> None:
        if isinstance(module, nn.Sequential):
            layers = linears(module, fqn)
            if len(layers) >= 2:
                for name, layer in layers[1:-1] if keep_mlp_ends else layers:
                    if filter_fn is None or filter_fn(layer, name):
                        found[name] = layer
                return
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    return found


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


def calibration_pass(
    model: nn.Module,
    calibration: Iterable[Any],
    forward_fn: ForwardFn,
    counters: Mapping[nn.Module, Any],
    linears: Mapping[str, nn.Module] | None = None,
) -> dict[str, Moments]:
    """One pass over ``calibration`` in eval mode without gradients.

    A forward pre-hook on each module of ``counters`` feeds the KJT it receives to its counter's
    ``update`` (sharded collections see the local batch with global ids); forward hooks
    accumulate the output moments of ``linears``.  The training flags of all modules are
    restored and hooks removed, even on error.

    Returns:
        Dict[str, Moments]: Linear fqn -> output moments (of this process's batches).
    """
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, kwargs, c=counter: c.update(args[0] if args else kwargs["features"]),
            with_kwargs=True,
        )
        for module, counter in counters.items()
    ]
    training = {m: m.training for m in model.modules()}
    collector = LinearOutputCollector(linears or {})
    try:
        model.eval()
        with collector, torch.no_grad():
            for batch in calibration:
                forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)
    return collector.moments


def calibrate(
    model: nn.Module,
    calibration: Iterable[Any],
    forward_fn: ForwardFn = default_forward,
    ebcs: Mapping[str, EmbeddingBagCollection] | None = None,
    linears: Mapping[str, nn.Linear] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Moments]]:
    """Lookup counts of ``ebcs`` and output moments of ``linears`` in one
    :func:`calibration_pass`.

    Returns:
        tuple: (EBC fqn -> table name -> per-row counts, Linear fqn -> output moments).
    """
    ebcs = dict(ebcs or {})
    counters = {
        fqn: LookupCounter(ebc.embedding_bag_configs(), ebc.is_weighted(), ebc.device)
        for fqn, ebc in ebcs.items()
    }
    moments = calibration_pass(
        model, calibration, forward_fn, {ebcs[f]: c for f, c in counters.items()}, linears
    )
    return {fqn: c.counts() for fqn, c in counters.items()}, moments


def linear_factors(
    fqn: str,
    layer: nn.Linear,
    moments: Moments | None,
    config: LowRankConfig,
) -> tuple[ReportRow, LowRankLinear | None]:
    """Rank choice and factors of one Linear layer (AFM from its output ``moments``, SVD from
    its weight when ``moments`` is None); ``None`` when two factors would not be smaller."""
    name = f"layer {fqn!r}"
    basis = None
    if moments is not None:
        basis = afm_basis(moments, name)
        spectrum = basis.eigenvalues
    else:
        spectrum = torch.linalg.svdvals(layer.weight.detach().to(torch.float64)) ** 2
    if config.linear_rank is not None:
        k = config.linear_rank
        check_rank(k, spectrum.numel(), name)
    else:
        assert config.linear_variance is not None
        k = rank_for_variance(spectrum, config.linear_variance)
    before = sum(p.numel() * p.element_size() for p in layer.parameters())
    shape = (layer.out_features, layer.in_features)
    if k * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
        return ReportRow(fqn, "linear", shape, "kept", None, before, before, None), None
    new = afm_linear(layer, basis, k) if basis is not None else svd_linear(layer, k)[0]
    after = sum(p.numel() * p.element_size() for p in new.parameters())
    variance = float(explained_variance_ratio(spectrum)[k - 1])
    method = "AFM" if basis is not None else "SVD"
    return ReportRow(fqn, "linear", shape, method, k, before, after, variance), new


def _method(config: LowRankConfig) -> str:
    return "AFM" if isinstance(config, AFMConfig) else "SVD"


def _plan_lowrank(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    assert isinstance(config, LowRankConfig)
    is_afm = isinstance(config, AFMConfig)
    ebcs = find_embedding_bag_collections(model, filter_fn) if config.embeddings else {}
    linears = (
        find_mlp_hidden_linears(model, config.keep_mlp_ends, filter_fn) if config.linear else {}
    )
    table_owners(ebcs, config.table_overrides)
    counts: dict[str, dict[str, torch.Tensor]] = {}
    linear_moments: dict[str, Moments] = {}
    if is_afm and (ebcs or linears):
        if calibration is None:
            raise ValueError("AFMConfig needs calibration data (an iterable of batches)")
        counts, linear_moments = calibrate(model, calibration, forward_fn, ebcs, linears)

    # tables: statistics -> basis -> global rank selection -> factors
    bases: dict[str, PrincipalBasis] = {}
    spectra: dict[str, TableSpectrum] = {}
    weights: dict[str, torch.Tensor] = {}
    for fqn, ebc in ebcs.items():
        for table in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[table.name].weight
            if is_afm:
                moments = table_moments(weight, counts[fqn][table.name], table.name)
                bases[table.name] = afm_basis(moments, f"table {table.name!r}")
            else:
                moments = table_moments(weight, None, table.name)
                bases[table.name] = svd_basis(moments, f"table {table.name!r}")
            weights[table.name] = weight
            spectra[table.name] = TableSpectrum(
                table.num_embeddings,
                table.embedding_dim,
                bases[table.name].eigenvalues,
                float(moments.count),
            )
    ranks = select_ranks(spectra, config) if spectra else {}

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        tables = ebc.embedding_bag_configs()
        table_ranks = {t.name: ranks[t.name] for t in tables if ranks[t.name] is not None}
        for t in tables:
            weight, k = weights[t.name], ranks[t.name]
            before = weight.numel() * weight.element_size()
            rows.append(
                ReportRow(
                    name=t.name,
                    kind="table",
                    shape=(t.num_embeddings, t.embedding_dim),
                    method="kept" if k is None else _method(config),
                    rank=k,
                    bytes_before=before,
                    bytes_after=before
                    if k is None
                    else compressed_table_bytes(t.num_embeddings, t.embedding_dim, k),
                    explained_variance=None if k is None else bases[t.name].explained_variance(k),
                )
            )
        if not table_ranks:
            continue
        module = LowRankEmbeddingBagCollection(tables, table_ranks, ebc.is_weighted(), ebc.device)
        for t in tables:
            k = ranks[t.name]
            if k is None:
                module.load_table_(t.name, weights[t.name])
            else:
                basis = bases[t.name]
                module.load_table_(
                    t.name,
                    factor_table(weights[t.name], basis, k),
                    projection(basis, k),
                    basis.mean.to(torch.float32),
                )
        replacements[fqn] = module

    for fqn, layer in linears.items():
        row, new = linear_factors(fqn, layer, linear_moments[fqn] if is_afm else None, config)
        rows.append(row)
        if new is not None:
            replacements[fqn] = new
    return ConversionPlan(replacements, rows)


def _plan_mec(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None,
    filter_fn: FilterFn | None,
    forward_fn: ForwardFn,
) -> ConversionPlan:
    """Product-quantizes every selected table (MEC or plain weighted k-means, ``config.mode``).

    Lookup counts come from one calibration pass (:func:`calibrate`); each table not skipped by
    an override is quantized by :func:`~torchrec_compress.pq.train_pq_table` on CPU.  A table
    skipped inside a collection that has quantized tables is stored exactly, as ``N`` codewords
    of one subspace (its rows) and identity codes, so the collection stays one module.

    In a low-rank model (after ``compress_`` with :class:`AFMConfig`) the k-dim factor tables
    are quantized instead (rows x M codes, then the projection back to d): the factor columns
    are first reordered so that every subspace gets an equal share of the principal
    components' variance (:func:`~torchrec_compress.pq.subspace_order`), and the projection
    rows with them.
    """
    assert isinstance(config, MECConfig)
    ebcs = find_embedding_bag_collections(model, filter_fn, lowrank_factors=True)
    owners = table_owners(ebcs, config.table_overrides)
    skipped = {name for name, o in config.table_overrides.items() if o.skip}
    counts: dict[str, dict[str, torch.Tensor]] = {}
    if config.popularity_weighting and set(owners) - skipped:
        if calibration is None:
            raise ValueError(
                "MECConfig(popularity_weighting=True) needs calibration data (an iterable of "
                "batches) for the lookup counts; pass calibration= or popularity_weighting=False"
            )
        counts, _ = calibrate(model, calibration, forward_fn, ebcs)

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    method = "MEC" if config.mode == "mec" else "PQ"
    for fqn, ebc in ebcs.items():
        tables = ebc.embedding_bag_configs()
        lowrank = lowrank_parent(model, fqn)
        factor_ranks = lowrank.ranks() if lowrank is not None else {}
        codes: dict[str, torch.Tensor] = {}
        codebooks: dict[str, torch.Tensor] = {}
        orders: dict[str, torch.Tensor] = {}
        for t in tables:
            weight = ebc.embedding_bags[t.name].weight.detach()
            if weight.device.type == "meta":
                raise ValueError(f"table {t.name!r}: its weights are on the meta device")
            before = weight.numel() * weight.element_size()
            shape = (t.num_embeddings, t.embedding_dim)
            if t.name in skipped:
                codes[t.name] = torch.arange(t.num_embeddings).unsqueeze(1)
                codebooks[t.name] = weight.float().cpu().unsqueeze(0)
                after = before + t.num_embeddings * _code_bytes(t.num_embeddings, t.name)
                rows.append(ReportRow(t.name, "table", shape, "kept", None, before, after, None))
                continue
            table_counts = counts[fqn][t.name].cpu() if counts else None
            table_config = config.for_table(t.name)
            weight = weight.cpu()
            if t.name in factor_ranks:
                orders[t.name] = subspace_order(weight, table_counts, table_config, t.name)
                weight = weight[:, orders[t.name]]
            codes[t.name], codebooks[t.name], metrics = train_pq_table(
                weight, table_counts, table_config, t.name
            )
            num_subspaces, ksub, dsub = codebooks[t.name].shape
            after = t.num_embeddings * num_subspaces * codes[t.name].element_size()
            after += num_subspaces * ksub * dsub * 4
            rows.append(
                ReportRow(
                    name=t.name,
                    kind="table",
                    shape=shape,
                    method=method,
                    rank=num_subspaces,
                    bytes_before=before,
                    bytes_after=after,
                    explained_variance=None,
                    perplexity=_mean_perplexity(metrics),
                )
            )
        if all(t.name in skipped for t in tables):
            continue
        module = PQEmbeddingBagCollection(tables, codes, codebooks, ebc.is_weighted())
        module = module.to(ebc.device)
        if lowrank is None:
            replacements[fqn] = module
        else:
            replacements[fqn.rpartition(".")[0]] = lowrank.with_factor_collection(module, orders)
    return ConversionPlan(replacements, rows)


def lowrank_parent(model: nn.Module, fqn: str) -> LowRankEmbeddingBagCollection | None:
    """The ``LowRankEmbeddingBagCollection`` whose ``factor_ebc`` is at ``fqn``, if any."""
    parent, _, child = fqn.rpartition(".")
    if child != "factor_ebc":
        return None
    module = model.get_submodule(parent)
    return module if isinstance(module, LowRankEmbeddingBagCollection) else None


def _code_bytes(ksub: int, table_name: str) -> int:
    try:
        return torch.empty((), dtype=code_dtype(ksub)).element_size()
    except ValueError as e:
        raise ValueError(f"table {table_name!r}: {e}") from e


def _mean_perplexity(metrics: QuantizationMetrics) -> float:
    return sum(metrics.perplexity) / len(metrics.perplexity)


# config type -> planner; a new method registers its config class here.
CONVERTERS: dict[type[CompressionConfig], Planner] = {
    AFMConfig: _plan_lowrank,
    SVDConfig: _plan_lowrank,
    MECConfig: _plan_mec,
}


def compress_(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Iterable[Any] | None = None,
    filter_fn: FilterFn | None = None,
    forward_fn: ForwardFn = default_forward,
) -> CompressionReport:
    """Compresses ``model`` in place and reports what changed.

    Every selected module is planned first (statistics, ranks, factors); the swap happens only
    when all of them succeeded, so on any error the model is unchanged.

    Args:
        model (nn.Module): e.g. ``torchrec.models.dlrm.DLRM``; compressed modules are swapped
            into their parents (the model itself cannot be the swapped module).
        config (CompressionConfig): :class:`AFMConfig`, :class:`SVDConfig`, ...
        calibration (Optional[Iterable]): batches (``Batch`` or ``KeyedJaggedTensor``); needed by
            AFM, accepted and ignored by SVD.  Iterated once.
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): ``(module, fqn) -> bool``; only
            modules it accepts are compressed.
        forward_fn (Callable[[nn.Module, Any], Any]): how to run the model on one batch;
            default :func:`default_forward`.

    Returns:
        CompressionReport: one row per table/layer, with bytes and explained variance.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg]))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.arange(40) % 50, lengths=torch.full((20,), 2))
        >>> report = compress_(model, AFMConfig(rank=4), calibration=[kjt])
        >>> type(model[0]).__name__, report.rows[0].rank
        ('LowRankEmbeddingBagCollection', 4)
    """
    planner = CONVERTERS.get(type(config))
    if planner is None:
        raise TypeError(
            f"no converter for {type(config).__name__}; known configs: "
            f"{sorted(c.__name__ for c in CONVERTERS)}"
        )
    plan = planner(model, config, calibration, filter_fn, forward_fn)
    if "" in plan.replacements:
        raise ValueError(
            f"cannot replace the model itself ({type(model).__name__}) in place; "
            "wrap it in a parent module"
        )
    for fqn, new_module in plan.replacements.items():
        parent_fqn, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn), child, new_module)
    return CompressionReport(plan.rows)
