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

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.config import (
    AFMConfig,
    CompressionConfig,
    LowRankConfig,
    MECConfig,
    PQConfig,
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
    BYTES_PER_ELEMENT,
    RankChoice,
    TableSpectrum,
    choose_ranks,
    compressed_table_bytes,
    explained_variance_ratio,
    rank_for_variance,
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
    # why a table or layer was kept (or how it is stored), e.g. "rank 8 would not be smaller"
    note: str | None = None


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
        ``later`` left (``after - later.before + later.after``); methods join as ``"AFM+MEC"``
        (a row ``later`` kept keeps this method, with ``later``'s note); the rank and explained
        variance come from here, the perplexity from ``later``.

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
            if nxt is None:
                rows.append(r)
                continue
            after = r.bytes_after - nxt.bytes_before + nxt.bytes_after
            if nxt.method == "kept":  # its note says why (and any identity-code bytes)
                rows.append(dataclasses.replace(r, bytes_after=after, note=nxt.note or r.note))
                continue
            rows.append(
                ReportRow(
                    name=r.name,
                    kind=r.kind,
                    shape=r.shape,
                    method=nxt.method if r.method == "kept" else f"{r.method}+{nxt.method}",
                    rank=r.rank,
                    bytes_before=r.bytes_before,
                    bytes_after=after,
                    explained_variance=r.explained_variance,
                    perplexity=nxt.perplexity,
                    note=nxt.note,
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
        if any(r.note is not None for r in self.rows):
            header = (*header, "note")
            lines = [(*line, r.note or "") for line, r in zip(lines, self.rows, strict=True)]
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


def find_mlps(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, list[str]]:
    """The model's MLPs: fully qualified name -> the fqns of its ``nn.Linear`` layers, in module
    order (a lone Linear outside any MLP is an MLP of one layer, named by itself).

    An MLP is the outermost module that is either an ``nn.Sequential`` holding two or more
    ``nn.Linear`` layers at any depth (``torchrec.modules.mlp.MLP`` is a Sequential of
    ``Perceptron``\\ s; DLRM's over arch is a Sequential of an MLP and a final Linear, one MLP
    of all their layers), or a module with two or more Linear layers among its children and
    its ``nn.ModuleList`` children's children (TorchRec's ``TestDHNArch``: ``linear0``,
    ``linear1``; ``TestDenseArch``: ``hidden_layers`` then ``linear``).  Layers
    inside an existing ``LowRankLinear`` are never listed; ``filter_fn(layer, fqn)`` drops layers
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

    def linears(module: nn.Module, fqn: str) -> list[str]:
        if isinstance(module, LowRankLinear):
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
        if isinstance(module, LowRankLinear):
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
    ``nn.Linear`` of the model (outside ``LowRankLinear``) is taken.

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


def _no_linear_reason(model: nn.Module, keep_mlp_ends: bool) -> str:
    mlps = find_mlps(model)
    if not mlps:
        return "the model has no nn.Linear layer outside LowRankLinear"
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

    Raises:
        ValueError: when ``calibration`` yields no batch (e.g. an exhausted iterator).

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
    num_batches = 0
    try:
        model.eval()
        with collector, torch.no_grad():
            for batch in calibration:
                forward_fn(model, batch)
                num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)
    if num_batches == 0:
        raise ValueError(
            f"calibration data {type(calibration).__name__} yielded no batch (an empty list, or "
            "an iterator already exhausted, e.g. by an earlier call); it is iterated once: "
            "pass a list or a fresh iterator"
        )
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
    its weight when ``moments`` is None); ``None`` (a "kept" row with a note, and a warning)
    when two factors would not be smaller, e.g. any rank of a 1-output logit layer.

    Args:
        fqn (str): the layer's fully qualified name (report row and messages).
        layer (nn.Linear): the layer.
        moments (Optional[Moments]): its output moments (AFM) or ``None`` (SVD).
        config (LowRankConfig): ``linear_rank`` or ``linear_variance``.

    Returns:
        tuple[ReportRow, Optional[LowRankLinear]]: the report row and the replacement.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     config = SVDConfig(rank=4, linear=True, linear_rank=2)
        ...     row, new = linear_factors("logit", nn.Linear(8, 1), None, config)
        >>> row.method, new, row.note
        ('kept', None, "linear_rank 2 exceeds the layer's 1 principal directions")
    """
    name = f"layer {fqn!r}"
    basis = None
    if moments is not None:
        basis = afm_basis(moments, name)
        spectrum = basis.eigenvalues
    else:
        spectrum = torch.linalg.svdvals(layer.weight.detach().to(torch.float64)) ** 2
    if config.linear_rank is not None:
        k = config.linear_rank
        source = f"linear_rank {k}"
    else:
        assert config.linear_variance is not None
        k = rank_for_variance(spectrum, config.linear_variance)
        source = f"linear_variance {config.linear_variance}: rank {k}"
    before = sum(p.numel() * p.element_size() for p in layer.parameters())
    shape = (layer.out_features, layer.in_features)
    has_bias = basis is not None or layer.bias is not None
    after = BYTES_PER_ELEMENT * (
        k * (layer.in_features + layer.out_features) + (k + layer.out_features) * has_bias
    )
    if k > spectrum.numel() or after >= before:
        reason = (
            f"exceeds the layer's {spectrum.numel()} principal directions"
            if k > spectrum.numel()
            else f"would not be smaller ({after} >= {before} bytes)"
        )
        note = f"{source} {reason}"
        warnings.warn(f"{type(config).__name__} keeps {name}: {note}", stacklevel=3)
        return ReportRow(fqn, "linear", shape, "kept", None, before, before, None, note=note), None
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
        reason = _no_linear_reason(model, config.keep_mlp_ends)
        warnings.warn(f"linear=True found no Linear layer to compress: {reason}", stacklevel=3)
    counts: dict[str, dict[str, torch.Tensor]] = {}
    linear_moments: dict[str, Moments] = {}
    if is_afm and (ebcs or linears):
        if calibration is None:
            raise ValueError("AFMConfig needs calibration data (an iterable of batches)")
        counts, linear_moments = calibrate(model, calibration, forward_fn, ebcs, linears)

    bases: dict[str, PrincipalBasis] = {}
    spectra: dict[str, TableSpectrum] = {}
    for fqn, ebc in ebcs.items():
        for table in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[table.name].weight
            label = f"table {table.name!r}"
            if is_afm:
                moments = table_moments(weight, counts[fqn][table.name], table.name)
                bases[table.name] = afm_basis(moments, label)
            else:
                moments = table_moments(weight, None, table.name)
                bases[table.name] = svd_basis(moments, label)
            spectra[table.name] = TableSpectrum(
                table.num_embeddings,
                table.embedding_dim,
                bases[table.name].eigenvalues,
                float(moments.count),
            )
    choices = choose_ranks(spectra, config) if spectra else {}

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        module, table_rows = _lowrank_collection(ebc, bases, choices, _method(config))
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
    method: str,
) -> tuple[LowRankEmbeddingBagCollection | None, list[ReportRow]]:
    """One collection's low-rank replacement (kept tables at full width inside it), or ``None``
    when every table is kept, and its report rows."""
    tables = ebc.embedding_bag_configs()
    rows = []
    for t in tables:
        weight, k = ebc.embedding_bags[t.name].weight, choices[t.name].rank
        before = weight.numel() * weight.element_size()
        after = (
            before if k is None else compressed_table_bytes(t.num_embeddings, t.embedding_dim, k)
        )
        rows.append(
            ReportRow(
                name=t.name,
                kind="table",
                shape=(t.num_embeddings, t.embedding_dim),
                method="kept" if k is None else method,
                rank=k,
                bytes_before=before,
                bytes_after=after,
                explained_variance=None if k is None else bases[t.name].explained_variance(k),
                note=choices[t.name].note,
            )
        )
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
            module.load_table_(
                t.name,
                factor_table(weight, basis, k),
                projection(basis, k),
                basis.mean.to(torch.float32),
            )
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
    ebcs = find_embedding_bag_collections(model, filter_fn, lowrank_factors=True)
    table_owners(ebcs, config.table_overrides)
    reasons = {
        t.name: _mec_keep_reason(t, config)
        for ebc in ebcs.values()
        for t in ebc.embedding_bag_configs()
    }
    counts: dict[str, dict[str, torch.Tensor]] = {}
    if config.popularity_weighting and any(r is None for r in reasons.values()):
        if calibration is None:
            raise ValueError(
                "MECConfig(popularity_weighting=True) needs calibration data (an iterable of "
                "batches) for the lookup counts; pass calibration= or popularity_weighting=False"
            )
        counts, _ = calibrate(model, calibration, forward_fn, ebcs)
    _warn_kept_tables(reasons, "MEC" if config.mode == "mec" else "PQ")

    replacements: dict[str, nn.Module] = {}
    rows: list[ReportRow] = []
    for fqn, ebc in ebcs.items():
        module, table_rows = _quantize_collection(model, fqn, ebc, config, reasons, counts)
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


def _mec_keep_reason(table: EmbeddingBagConfig, config: MECConfig) -> str | None:
    """Why ``table`` stays unquantized, or ``None``: skipped by an override, a global ``M``
    that does not divide its dimension, or codes + codebooks not smaller than its rows.

    Raises:
        ValueError: naming the table when its own override's ``num_subspaces`` does not
            divide its dimension (an explicit per-table choice, unlike the global ``M``).
    """
    override = config.table_overrides.get(table.name)
    if override is not None and override.skip:
        return "skipped by table_overrides"
    table_config = config.for_table(table.name)
    n, d, m = table.num_embeddings, table.embedding_dim, table_config.num_subspaces
    if d % m:
        if override is not None and override.num_subspaces is not None:
            table_config.check_table(table.name, d)
        return f"num_subspaces {m} does not divide embedding_dim {d}"
    if n == 0:
        return None  # train_pq_table names the empty table
    ksub = min(table_config.num_centroids, n)
    after = n * m * _code_bytes(ksub, table.name) + ksub * d * BYTES_PER_ELEMENT
    before = n * d * BYTES_PER_ELEMENT
    if after >= before:
        return (
            f"num_subspaces {m} x num_centroids {ksub} would not be smaller "
            f"({after} >= {before} bytes)"
        )
    return None


def _warn_kept_tables(reasons: Mapping[str, str | None], config_name: str) -> None:
    kept = {n: r for n, r in reasons.items() if r is not None and not r.startswith("skipped")}
    if kept:
        text = "; ".join(f"table {n!r}: {r}" for n, r in kept.items())
        warnings.warn(
            f"{config_name} keeps {len(kept)} table(s) uncompressed: {text}", stacklevel=4
        )


def _kept_row(table: EmbeddingBagConfig, weight: torch.Tensor, note: str | None) -> ReportRow:
    before = table.num_embeddings * table.embedding_dim * weight.element_size()
    shape = (table.num_embeddings, table.embedding_dim)
    return ReportRow(table.name, "table", shape, "kept", None, before, before, None, note=note)


def _quantize_collection(
    model: nn.Module,
    fqn: str,
    ebc: EmbeddingBagCollection,
    config: MECConfig,
    reasons: Mapping[str, str | None],
    counts: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[tuple[str, nn.Module] | None, list[ReportRow]]:
    """One collection's replacement (fqn, module), or ``None`` when no table is quantized (or
    the quantized collection would not be smaller), and its report rows."""
    tables = ebc.embedding_bag_configs()
    weights = {t.name: ebc.embedding_bags[t.name].weight.detach() for t in tables}
    if all(reasons[t.name] is not None for t in tables):
        return None, [_kept_row(t, weights[t.name], reasons[t.name]) for t in tables]
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
            row = _kept_row(t, weight, None)
            extra = t.num_embeddings * _code_bytes(t.num_embeddings, t.name)
            row.bytes_after += extra
            row.note = f"{reason}; stored exactly as identity codes (+{extra} bytes)"
            rows.append(row)
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
        rows.append(_pq_row(t, weights[t.name], codes[t.name], codebooks[t.name], metrics, config))
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    if after >= before:
        note = f"collection {fqn!r} would not be smaller quantized ({after} >= {before} bytes)"
        return None, [_kept_row(t, weights[t.name], note) for t in tables]
    module = PQEmbeddingBagCollection(tables, codes, codebooks, ebc.is_weighted()).to(ebc.device)
    if lowrank is None:
        return (fqn, module), rows
    return (fqn.rpartition(".")[0], lowrank.with_factor_collection(module, orders)), rows


def _pq_row(
    table: EmbeddingBagConfig,
    weight: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    metrics: QuantizationMetrics,
    config: MECConfig,
) -> ReportRow:
    num_subspaces, ksub, dsub = codebooks.shape
    return ReportRow(
        name=table.name,
        kind="table",
        shape=(table.num_embeddings, table.embedding_dim),
        method="MEC" if config.mode == "mec" else "PQ",
        rank=num_subspaces,
        bytes_before=weight.numel() * weight.element_size(),
        bytes_after=codes.numel() * codes.element_size() + num_subspaces * ksub * dsub * 4,
        explained_variance=None,
        perplexity=_mean_perplexity(metrics),
    )


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


def _check_unsharded(model: nn.Module) -> None:
    """``compress_`` swaps modules of an unsharded, unwrapped model; anything else must go the
    sharded route (or be compressed before wrapping)."""
    if isinstance(model, DistributedModelParallel) or any(
        isinstance(m, ShardedModule) for m in model.modules()
    ):
        raise TypeError(
            f"compress_ works on unsharded models, got a sharded {type(model).__name__}: "
            "compress a DistributedModelParallel model with "
            "torchrec_compress.distributed.compress_sharded (AFMConfig/SVDConfig) or "
            "torchrec_compress.distributed.compress_sharded_pq (MECConfig; for PQConfig pass "
            "config.to_mec_config()), which write a checkpoint for the re-sharded compressed model"
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


# config type -> planner; a new method registers its config class here.
CONVERTERS: dict[type[CompressionConfig], Planner] = {
    AFMConfig: _plan_lowrank,
    SVDConfig: _plan_lowrank,
    MECConfig: _plan_mec,
    PQConfig: _plan_pq,
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

    Never bigger, never silent: a table or layer is replaced only when that makes it smaller;
    otherwise it is kept, with a warning and a ``note`` in its report row (e.g. a rank above
    ``min(rows, dim)``, a variance target that needs every direction, ``M`` not dividing a
    table's dimension, a 1-output logit layer).  A collection whose tables are all kept stays
    the original module.  Errors, rather than a silent empty report: a sharded
    (``DistributedModelParallel``) or DDP-wrapped model, nothing to compress (e.g. a model
    already compressed with the same method), calibration data that yields no batch.
    ``EmbeddingCollection`` (sequence) tables are not supported: a warning names them.

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

    Raises:
        TypeError: for a sharded or DDP-wrapped model (naming the sharded route), or a config
            type without converter.
        ValueError: naming the table/layer/value at fault; when nothing is left to compress.

    Example::

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
    _check_unsharded(model)
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
